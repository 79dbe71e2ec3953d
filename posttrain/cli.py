"""The `posttrain` command line: train, validate, merge, plot, demo, serve, jobs, pipeline, quickstart, kfp, rl
and llama-stack."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from posttrain.errors import PosttrainError
from posttrain.kfp.commands import kfp_app
from posttrain.llama_stack.commands import llama_stack_app
from posttrain.rl.commands import rl_app
from posttrain.service.commands import jobs_app, serve
from posttrain.spec import JobSpec, describe_fields, load_spec, split_config_and_overrides

console = Console(stderr=True)
app = typer.Typer(
    name="posttrain",
    help="Post-train language models (SFT, DPO, reward, GRPO, online GRPO, PPO) from one YAML config.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},
    rich_markup_mode="markdown",
)

ConfigArg = Annotated[Path | None, typer.Argument(help="YAML config (omit to use the defaults).", show_default=False)]
OverridesArg = Annotated[
    list[str] | None, typer.Argument(help="Dotted overrides, e.g. training.learning_rate=1e-4.", show_default=False)
]


def config_keys_text() -> str:
    """Every JobSpec key with its default and description as a Markdown table, generated from the schema."""
    lines = ["| key | default | description |", "|---|---|---|"]
    for key, _type, default, description in describe_fields():
        lines.append(f"| `{key}` | `{default}` | {description.replace('|', '/')} |")
    return "\n".join(lines)


def _load(config: Path | None, overrides: list[str] | None) -> JobSpec:
    config, overrides = split_config_and_overrides(config, overrides)
    if config is not None and config.is_file():
        from posttrain.pipeline import is_pipeline_document
        from posttrain.spec import load_yaml

        if is_pipeline_document(load_yaml(config.read_text(), str(config))):
            raise PosttrainError(f"{config} is a pipeline (it has stages:); run it with: posttrain pipeline {config}")
    return load_spec(config, overrides)


def fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def default_job_dir(spec: JobSpec) -> Path:
    return Path(spec.output.dir) if spec.output.dir else Path("runs") / (spec.name or spec.method.name)


def remove_previous_run(job_dir: Path) -> None:
    """Delete a previous run for --overwrite; refuse anything that does not look like one."""
    from posttrain.jobdir import JobDir

    run = JobDir(job_dir)
    if not job_dir.is_dir():
        raise PosttrainError(f"--overwrite: {job_dir} is not a directory")
    if any(job_dir.iterdir()) and not (run.spec_path.exists() or run.status_path.exists()):
        raise PosttrainError(f"--overwrite: {job_dir} is not a posttrain run (no spec.json or status.json); "
                             "refusing to delete it")
    shutil.rmtree(job_dir)


def print_summary(result, spec: JobSpec) -> None:
    table = Table.grid(padding=(0, 2))
    table.add_row("state", f"[bold]{result.state}[/]" + (f" ({result.error})" if result.error else ""))
    table.add_row("method", f"{spec.method.name} on {spec.model.name_or_path}")
    table.add_row("steps", f"{result.step}" + (f"/{result.total_steps}" if result.total_steps else ""))
    if result.final_loss is not None:
        table.add_row("final loss", f"{result.final_loss:.4f}")
    table.add_row("time", f"{result.runtime_s:.1f} s")
    if result.tokens_per_s:
        table.add_row("tokens/s", f"{result.tokens_per_s:.0f} (last logging interval)")
    table.add_row("job dir", str(result.job_dir))
    if result.node_rank is not None:
        done = "this node's ranks did their part; " if result.state == "succeeded" else ""
        table.add_row("node", f"{result.node_rank} of {spec.distributed.nnodes}: {done}rank 0 runs on another node "
                              f"and writes the results (metrics, final/) to {result.rank0_results}")
    if result.final_dir:
        table.add_row("final", f"{result.final_dir}  (adapter or model + tokenizer)")
    if result.node_rank is None:
        table.add_row("metrics", f"{result.job_dir / 'metrics.jsonl'}  ->  posttrain plot {result.job_dir}")
    if result.state in ("cancelled", "paused"):
        table.add_row("resume", f"posttrain train ... --resume  (output.dir={result.job_dir})")
    style = {"succeeded": "green", "cancelled": "yellow", "paused": "yellow"}.get(result.state, "red")
    console.print(Panel(table, title="posttrain", border_style=style, expand=False))


@app.command(epilog="**Config keys** (YAML sections or dotted overrides):\n\n" + config_keys_text())
def train(
    config: ConfigArg = None,
    overrides: OverridesArg = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest complete checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete an existing run in the output dir first.")] = False,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Job directory (same as output.dir).")] = None,
) -> None:
    """Train a model from a YAML config with optional dotted overrides.

    Example: posttrain train examples/llama3.2-3b-qlora-sft.yaml training.max_steps=50
    """
    from posttrain.distributed.runtime import torchrun_rank
    from posttrain.worker import run_worker

    try:
        spec = _load(config, overrides)
        job_dir = output or default_job_dir(spec)
        if overwrite and job_dir.exists() and not resume:
            remove_previous_run(job_dir)
        if spec.distributed.launcher == "torchrun" and torchrun_rank() is None:
            from posttrain.launchers.torchrun import run_torchrun

            result = run_torchrun(spec, job_dir, resume=resume)  # the same worker, one process per rank
        elif spec.distributed.launcher == "kfp":
            from posttrain.kfp.runs import run_local_job

            result = run_local_job(spec, job_dir, resume=resume)  # its pipeline, here (kfp.local)
        else:
            result = run_worker(spec, job_dir, resume=resume)
    except PosttrainError as exc:
        fail(exc.message)
    print_summary(result, spec)
    raise typer.Exit(result.exit_code)


@app.command()
def validate(config: ConfigArg = None, overrides: OverridesArg = None) -> None:
    """Check a config, its model and its dataset without training."""
    from posttrain.preflight import preflight

    try:
        spec = _load(config, overrides)
        report = preflight(spec)
    except PosttrainError as exc:
        fail(exc.message)
    table = Table.grid(padding=(0, 2))
    table.add_row("method", report.method)
    table.add_row("model", f"{report.model} ({report.model_location})")
    table.add_row("device", f"{report.device}, {report.dtype}")
    table.add_row("data", f"{report.data_source} ({report.data_format}): {report.train_rows} training rows"
                  + (f", {report.eval_rows} validation rows" if report.eval_rows is not None else ""))
    table.add_row("steps", f"{report.total_steps} ({report.steps_per_epoch} per epoch)")
    for warning in report.warnings:
        table.add_row("[yellow]warning[/]", warning)
    console.print(Panel(table, title="config is valid", border_style="green", expand=False))


@app.command()
def merge(
    adapter: Annotated[Path, typer.Argument(help="LoRA adapter folder, e.g. runs/my-run/final.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the merged model.")],
    base: Annotated[str | None, typer.Option(help="Base model (default: the one the adapter names).")] = None,
) -> None:
    """Merge a LoRA adapter into its base model and save a standalone model."""
    from posttrain.modeling import merge_adapter

    try:
        path = merge_adapter(adapter, output, base)
    except PosttrainError as exc:
        fail(exc.message)
    console.print(f"merged model written to [bold]{path}[/]")


@app.command()
def plot(
    run_dir: Annotated[Path, typer.Argument(help="A job directory (holds metrics.jsonl).")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="PNG path (default RUN_DIR/curves.png).")] = None,
) -> None:
    """Write a PNG of the loss (and reward, for GRPO/DPO) curves of a run."""
    from posttrain.plot import plot_run

    try:
        path = plot_run(run_dir, output)
    except PosttrainError as exc:
        fail(exc.message)
    console.print(f"curves written to [bold]{path}[/]")


@app.command()
def demo(
    model: Annotated[str, typer.Option(help="tiny (random init, seconds), smollm2 (SmolLM2-135M-Instruct) "
                                            "or a chat model folder / hub id.")] = "tiny",
    steps: Annotated[int | None, typer.Option(help="Optimizer steps for every stage (default: each stage's "
                                                   "own, tuned per model).", show_default=False)] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where the demo runs go.")] = Path("runs/demo"),
) -> None:
    """SFT (a house style) -> DPO (concise answers) -> GRPO ('#### N' answers to word problems), each with
    LoRA, with before/after answers to held-out questions. Exits 1 if a stage's measure does not move."""
    from posttrain.demo import run_demo

    try:
        ok = run_demo(output, steps, console, model)
    except PosttrainError as exc:
        fail(exc.message)
    raise typer.Exit(0 if ok else 1)


@app.command()
def quickstart(
    experiment: Annotated[str, typer.Argument(help="sft, rw (reward model), dpo or ppo (actor, critic, ref and rew models).")],
    keys: Annotated[list[str] | None, typer.Argument(help="ReaLHF quickstart keys, e.g. experiment_name=x "
                                                           "trial_name=y model.path=posttrain:tiny.",
                                                      show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the JobSpec (YAML) and exit.")] = False,
    output_root: Annotated[Path, typer.Option(help="Runs go to OUTPUT_ROOT/<experiment_name>/<trial_name>.")]
    = Path("runs"),
    set_: Annotated[list[str] | None, typer.Option("--set", help="A JobSpec override applied after the "
                                                                 "translation, e.g. training.max_steps=10.",
                                                   show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest complete checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete an existing run of this trial first.")]
    = False,
) -> None:
    """Run a ReaLHF-style quickstart experiment: its keys become one JobSpec, run as `posttrain train` runs it.

    Example: posttrain quickstart sft experiment_name=demo trial_name=t1 model.path=posttrain:tiny
    dataset.train_path=posttrain:alpaca dataset.train_tokens_per_batch=4096 (see docs/quickstart.md).
    """
    import tempfile

    from posttrain.quickstart import translate

    try:
        plan = translate(experiment, keys or [], output_root, set_)
    except PosttrainError as exc:
        fail(exc.message)
    if dry_run:
        typer.echo(plan.yaml(), nl=False)
        return
    for note in plan.ignored:
        console.print(f"[yellow]ignored[/] {note}", highlight=False)
    # The same command path as `posttrain train FILE`: the translated spec is that FILE.
    with tempfile.TemporaryDirectory(prefix="posttrain-quickstart-") as folder:
        config = Path(folder) / f"{plan.spec.name}.yaml"
        config.write_text(plan.yaml())
        train(config, None, resume=resume or plan.resume, overwrite=overwrite, output=plan.job_dir)


@app.command("pipeline")
def pipeline_command(
    config: Annotated[Path, typer.Argument(help="Pipeline YAML: a `stages:` list of JobSpecs (docs/pipeline.md).")],
    overrides: Annotated[list[str] | None, typer.Argument(
        help="Dotted overrides: stages.NAME.a.b=c for one stage, a.b=c for every stage.", show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Resume the interrupted stage from its newest "
                                                          "checkpoint (finished stages are always skipped).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete the pipeline's earlier run first.")] = False,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Pipeline directory (same as output_dir).")]
    = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and print the planned stages as JSON.")]
    = False,
) -> None:
    """Run stages (e.g. sft -> reward -> ppo) one after the other, each a JobSpec run as `posttrain train` runs
    it, in its own job dir under the pipeline's; ${stages.NAME.final} names an earlier stage's output.

    Example: posttrain pipeline examples/tiny-rlhf.yaml stages.ppo.training.max_steps=4
    """
    from posttrain.pipeline import load_pipeline, run_pipeline

    try:
        plan = load_pipeline(config, overrides, root=output)
        if dry_run:
            typer.echo(plan.plan_json(), nl=False)
            return
        if overwrite and plan.root.exists() and not resume:
            remove_previous_run(plan.root)
        result = run_pipeline(plan, resume=resume)
    except PosttrainError as exc:
        fail(exc.message)
    table = Table("stage", "method", "state", "steps", "job dir")
    for stage in plan.stages:
        ran = result.stages.get(stage.name)
        state = "skipped (done)" if stage.name in result.skipped else ran.state if ran else "not run"
        steps = f"{ran.step}/{ran.total_steps}" if ran and ran.total_steps else ""
        table.add_row(stage.name, stage.spec.method.name, state, steps, str(stage.job_dir.root))
    console.print(table)
    style = "green" if result.state == "succeeded" else "yellow" if result.state in ("paused", "cancelled") else "red"
    console.print(f"[{style}]pipeline {plan.name}: {result.state}[/]" + (f" ({result.error})" if result.error else "")
                  + ("; continue with --resume" if result.state in ("paused", "cancelled") else ""), highlight=False)
    raise typer.Exit(result.exit_code)


@app.command("config-keys")
def config_keys() -> None:
    """List every config key with its default and description (as in docs/config.md)."""
    typer.echo(config_keys_text())


app.add_typer(jobs_app, name="jobs", help="Submit and follow jobs on a posttrain server.")
app.add_typer(llama_stack_app, name="llama-stack", help="Llama Stack post_training providers: print a run.yaml.")
app.add_typer(kfp_app, name="kfp", help="Kubeflow Pipelines: compile a config to a pipeline, run it here or on a cluster.")
app.add_typer(rl_app, name="rl", help="Online RL: trajectory API, environments, inference server, trainer.")
app.command("serve")(serve)


def main() -> None:
    try:
        app()
    except PosttrainError as exc:  # errors raised outside a command's own handling
        console.print(f"[bold red]error:[/] {exc.message}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
