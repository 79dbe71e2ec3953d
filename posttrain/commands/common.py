"""What every ``posttrain`` command shares: the console, how a command fails, the run summary, the
config arguments and the default job directory.

Exit codes of the commands (one rule): 2 when the command cannot run as given (a bad config, file, option
or argument: the worker's "rejected input"); 1 when it ran and what it asked for failed (a server refused
the request or could not be reached, a job did not succeed). A job's own exit codes (paused 75, cancelled
130/143) pass through unchanged.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from posttrain.errors import PosttrainError
from posttrain.job.result import EXIT_BAD_INPUT, EXIT_FAILED, JobResult
from posttrain.spec import JobSpec, load_spec, split_config_and_overrides

EXIT_USAGE = EXIT_BAD_INPUT
console = Console(stderr=True)

ConfigArg = Annotated[Path | None, typer.Argument(help="YAML config (omit to use the defaults).", show_default=False)]
OverridesArg = Annotated[
    list[str] | None, typer.Argument(help="Dotted overrides, e.g. training.learning_rate=1e-4.", show_default=False)
]


def typer_group(help_text: str, **options: object) -> typer.Typer:
    """A command group with the same help options and error display as the top-level command."""
    return typer.Typer(help=help_text, no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                       context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},
                       rich_markup_mode="markdown", **options)  # type: ignore[arg-type]


def fail(problem: str | Exception, code: int | None = None) -> NoReturn:
    """End the command with one ``error:`` line on stderr. The exit code, unless given: 1 for a service's
    refusal (``posttrain.client.ServiceError``), 2 for anything else (the command's input)."""
    from posttrain.client import ServiceError

    message = problem.message if isinstance(problem, PosttrainError | ServiceError) else str(problem)
    if code is None:
        code = EXIT_FAILED if isinstance(problem, ServiceError) else EXIT_USAGE
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def load_config(config: Path | None, overrides: list[str] | None) -> JobSpec:
    """A JobSpec from a YAML file (or the defaults) and dotted overrides; a pipeline file is refused here."""
    config, overrides = split_config_and_overrides(config, overrides)
    if config is not None and config.is_file():
        from posttrain.pipeline import is_pipeline_document
        from posttrain.spec import load_yaml

        if is_pipeline_document(load_yaml(config.read_text(), str(config))):
            raise PosttrainError(f"{config} is a pipeline (it has stages:); run it with: posttrain pipeline {config}")
    return load_spec(config, overrides)


def default_job_dir(spec: JobSpec) -> Path:
    return Path(spec.output.dir) if spec.output.dir else Path("runs") / (spec.name or spec.method.name)


def remove_previous_run(job_dir: Path) -> None:
    """Delete a previous run for --overwrite; refuse anything that does not look like one."""
    from posttrain.job.directory import JobDir

    run = JobDir(job_dir)
    if not job_dir.is_dir():
        raise PosttrainError(f"--overwrite: {job_dir} is not a directory")
    if any(job_dir.iterdir()) and not (run.spec_path.exists() or run.status_path.exists()):
        raise PosttrainError(f"--overwrite: {job_dir} is not a posttrain run (no spec.json or status.json); "
                             "refusing to delete it")
    shutil.rmtree(job_dir)


def print_summary(result: JobResult, spec: JobSpec) -> None:
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
