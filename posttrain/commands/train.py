"""The training commands: ``posttrain train | validate | merge | plot | demo | quickstart | pipeline |
config-keys``. Each is short: the JobSpec, the worker (or the pipeline runner) and the summary do the work."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.panel import Panel
from rich.table import Table

from posttrain.commands.common import (
    ConfigArg,
    OverridesArg,
    console,
    default_job_dir,
    fail,
    load_config,
    print_summary,
    remove_previous_run,
)
from posttrain.errors import PosttrainError
from posttrain.spec import describe_fields

# The commands are collected on a group of their own and added to the top-level app by posttrain.cli.
_commands = typer.Typer()


def config_keys_text() -> str:
    """Every JobSpec key with its default and description as a Markdown table, generated from the schema."""
    lines = ["| key | default | description |", "|---|---|---|"]
    for key, _type, default, description in describe_fields():
        lines.append(f"| `{key}` | `{default}` | {description.replace('|', '/')} |")
    return "\n".join(lines)


@_commands.command(epilog="**Config keys** (YAML sections or dotted overrides):\n\n" + config_keys_text())
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
    from posttrain.job.ranks import torchrun_rank
    from posttrain.worker import run_worker

    try:
        spec = load_config(config, overrides)
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


@_commands.command()
def validate(config: ConfigArg = None, overrides: OverridesArg = None) -> None:
    """Check a config, its model and its dataset without training."""
    from posttrain.preflight import preflight

    try:
        spec = load_config(config, overrides)
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


@_commands.command()
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


@_commands.command()
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


@_commands.command()
def demo(
    model: Annotated[str, typer.Option(help="tiny (random init, seconds), smollm2 (SmolLM2-135M-Instruct) "
                                            "or a chat model folder / hub id.")] = "tiny",
    steps: Annotated[int | None, typer.Option(help="Optimizer steps for every stage (default: each stage's "
                                                   "own, tuned per model).", show_default=False)] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where the demo runs go.")] = Path("runs/demo"),
    seed: Annotated[int, typer.Option(help="training.seed of every stage (data order, sampling).")] = 42,
) -> None:
    """SFT (a house style) -> DPO (concise answers) -> GRPO ('#### N' answers to word problems), each with
    LoRA, with before/after answers to held-out questions. Exits 1 if a stage's measure does not move."""
    from posttrain.demo import run_demo

    try:
        ok = run_demo(output, steps, console, model, seed)
    except PosttrainError as exc:
        fail(exc.message)
    raise typer.Exit(0 if ok else 1)


@_commands.command()
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


@_commands.command("pipeline")
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


@_commands.command("config-keys")
def config_keys() -> None:
    """List every config key with its default and description (as in docs/config.md)."""
    typer.echo(config_keys_text())


def register(app: typer.Typer) -> None:
    """Add the training commands to ``app`` (the top-level ``posttrain``)."""
    for command in _commands.registered_commands:
        app.registered_commands.append(command)
