"""The `posttrain` command line: assembles the command groups of :mod:`posttrain.commands`.

train, validate, merge, plot, demo, quickstart, pipeline, config-keys (``commands.train``); eval
(``commands.eval``); serve and jobs (``commands.jobs``); chat; kfp; rl; llama-stack.
"""

from __future__ import annotations

import sys

from posttrain.commands import chat, jobs, kfp, llama_stack, rl, train
from posttrain.commands import eval as eval_command
from posttrain.commands.common import EXIT_USAGE, console, typer_group
from posttrain.errors import PosttrainError

app = typer_group("Post-train language models (SFT, DPO, reward, GRPO, online GRPO, PPO) from one YAML config.",
                  name="posttrain")
train.register(app)
eval_command.register(app)
app.add_typer(jobs.jobs_app, name="jobs", help="Submit and follow jobs on a posttrain server.")
app.add_typer(llama_stack.llama_stack_app, name="llama-stack",
              help="Llama Stack post_training providers: print a run.yaml.")
app.add_typer(kfp.kfp_app, name="kfp",
              help="Kubeflow Pipelines: compile a config to a pipeline, run it here or on a cluster.")
app.add_typer(rl.rl_app, name="rl", help="Online RL: trajectory API, environments, inference server, trainer.")
app.command("serve")(jobs.serve)
app.command("chat")(chat.chat)


def main() -> None:
    try:
        app()
    except PosttrainError as exc:  # errors raised outside a command's own handling
        console.print(f"[bold red]error:[/] {exc.message}", highlight=False)
        sys.exit(EXIT_USAGE)


if __name__ == "__main__":
    main()
