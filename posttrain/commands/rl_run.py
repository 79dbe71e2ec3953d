"""`posttrain rl env` (an environment on atroposlib's own command line) and `posttrain rl run` (the whole
loop from one config)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from posttrain.commands.common import fail
from posttrain.errors import PosttrainError


def env(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="gsm8k, digits, or module:ClassName of your own BaseEnv.")],
) -> None:
    """Run an environment with atroposlib's own command line: `serve`, `process` or `evaluate`, then its flags.

    Example: posttrain rl env gsm8k serve --env.tokenizer_name posttrain:smollm2
    --openai.model_name posttrain:smollm2 --openai.base_url http://localhost:9001/v1 --openai.server_type vllm

    `posttrain rl env NAME serve --help` lists every --env.* and --openai.* flag.
    """
    from posttrain.rl.envs import environment_class

    try:
        cls = environment_class(name)
    except PosttrainError as exc:
        fail(exc.message)
    # atroposlib reads its flags from sys.argv itself (argparse for the names, its own scan for the values).
    sys.argv = [f"posttrain rl env {name}", *ctx.args]
    cls.cli()


def run(
    config: Annotated[Path, typer.Argument(help="The loop's YAML config, e.g. examples/rl-math-tiny.yaml.")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Dotted overrides, e.g. trainer.training.max_steps=5.", show_default=False)
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="The trainer continues from its newest complete "
                                         "checkpoint in the run dir.")] = False,
) -> None:
    """Run the whole online RL loop: run-api, inference server, environment(s) and trainer.

    Waits for each part to be ready, shows one progress line, and stops every part (Ctrl-C, any part
    failing, or the trainer finishing). Logs: <run dir>/logs/; the trainer's job dir: <run dir>/trainer/.
    """
    from posttrain.rl.loop.config import load_run_config
    from posttrain.rl.loop.runner import run_loop

    try:
        loaded = load_run_config(config, overrides)
        outcome = run_loop(loaded, report=lambda line: typer.echo(line, err=True), resume=resume)
    except PosttrainError as exc:
        fail(exc.message)
    typer.echo(f"rl run {outcome.state}: {outcome.message}", err=True)
    raise typer.Exit(outcome.exit_code)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `posttrain rl` app."""
    app.command(
        "env",
        # Everything after NAME belongs to atroposlib, --help included.
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    )(env)
    app.command("run")(run)
