"""`posttrain kfp compile|run`: a JobSpec as a Kubeflow pipeline, compiled, run here or on a cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from posttrain.commands.common import console, default_job_dir, fail, typer_group
from posttrain.errors import PosttrainError
from posttrain.spec import JobSpec, load_spec, split_config_and_overrides

kfp_app = typer_group("Kubeflow Pipelines: compile a config to a pipeline (prepare data -> train -> export), run it "
                      "here (kfp.local) or on a KFP host.")

ConfigArg = Annotated[Path | None, typer.Argument(help="YAML config (omit to use the defaults).", show_default=False)]
OverridesArg = Annotated[
    list[str] | None, typer.Argument(help="Dotted overrides, e.g. distributed.kfp.use_gpu=true.", show_default=False)
]


def _load(config: Path | None, overrides: list[str] | None) -> JobSpec:
    config, overrides = split_config_and_overrides(config, overrides)
    return load_spec(config, overrides)


@kfp_app.command("compile")
def compile_command(
    config: ConfigArg = None,
    overrides: OverridesArg = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the IR YAML.")] = Path("pipeline.yaml"),
) -> None:
    """Write the config's pipeline as Kubeflow Pipelines IR YAML (upload it to any KFP host)."""
    from posttrain.kfp.pipeline import compile_pipeline, image_warning

    try:
        spec = _load(config, overrides)
        path = compile_pipeline(spec, output)
    except PosttrainError as exc:
        fail(exc.message)
    if warning := image_warning(spec):
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    console.print(f"pipeline written to [bold]{path}[/]")


@kfp_app.command("run")
def run_command(
    config: ConfigArg = None,
    overrides: OverridesArg = None,
    local: Annotated[bool, typer.Option("--local", help="Run the pipeline here with kfp.local (offline).")] = False,
    host: Annotated[str | None, typer.Option(help="KFP API host (default: distributed.kfp.host, KFP_HOST).")] = None,
    s3_bucket: Annotated[str | None, typer.Option(
        "--s3-bucket", help="Bucket for data and outputs (default: distributed.kfp.s3_bucket, KFP_S3_BUCKET).")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Job directory of a --local run.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="--local: continue from the newest checkpoint.")] = False,
) -> None:
    """Run the config's pipeline: here with --local, else submitted to a KFP host.

    Examples: posttrain kfp run my.yaml --local;  posttrain kfp run my.yaml --host https://kfp.example --s3-bucket b
    """

    try:
        spec = _load(config, overrides)
        if local:
            if host or s3_bucket:
                raise PosttrainError("--local runs here: --host and --s3-bucket are for a remote run")
            _run_local(spec, output or default_job_dir(spec), resume)
            return
        if output or resume:
            raise PosttrainError("--output and --resume are for --local runs (a remote run's outputs go to S3)")
        _submit(spec, host, s3_bucket)
    except PosttrainError as exc:
        fail(exc.message)


def _run_local(spec: JobSpec, job_dir: Path, resume: bool) -> None:
    from posttrain.kfp.runs import run_local

    result = run_local(spec, job_dir, resume=resume)
    style = "green" if result.state == "succeeded" else "red"
    console.print(f"[{style}]{result.state}[/]" + (f" ({result.error})" if result.error else ""), highlight=False)
    console.print(f"job dir: {result.job_dir}")
    if result.model_dir:
        console.print(f"model artifact: {result.model_dir}")
    raise typer.Exit(0 if result.state == "succeeded" else 1)


def _submit(spec: JobSpec, host: str | None, bucket: str | None) -> None:
    from posttrain.kfp.pipeline import image_warning
    from posttrain.kfp.runs import remote_settings, submit_remote

    remote_settings(spec, host, bucket)  # no host: say so before anything else
    if warning := image_warning(spec):
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    run = submit_remote(spec, host=host, bucket=bucket)
    for uri in run.uploaded:
        console.print(f"uploaded {uri}")
    console.print(f"submitted run [bold]{run.run_id}[/] to {run.host}")
    if run.pipeline_root:
        console.print(f"outputs: {run.pipeline_root}")
    console.print(run.url)
