"""``posttrain serve`` (the job service) and ``posttrain jobs ...`` (a client of it, through posttrain.client)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from posttrain.client import TERMINAL, Client, ServiceError
from posttrain.commands.common import EXIT_FAILED, fail, typer_group
from posttrain.errors import PosttrainError
from posttrain.service.hosts import is_loopback
from posttrain.service.settings import DEFAULT_DATA_DIR, DEFAULT_PORT, MiB, ServiceSettings
from posttrain.spec import split_config_and_overrides

jobs_app = typer_group("Submit and manage jobs on a posttrain service.")

Server = Annotated[str | None, typer.Option("--server", envvar="POSTTRAIN_SERVER",
                                            help="Service URL (default http://127.0.0.1:8322).")]
ApiKey = Annotated[str | None, typer.Option("--api-key", envvar="POSTTRAIN_API_KEY", help="API key of the service.",
                                            show_default=False)]
AsJson = Annotated[bool, typer.Option("--json", help="Print the server's JSON.")]


@contextmanager
def _connected(server: str | None, api_key: str | None) -> Iterator[Client]:
    """A client whose errors (the server's message, or 'cannot reach') end the command as one line."""
    try:
        with Client(server, api_key) as client:
            yield client
    except ServiceError as exc:
        fail(exc)


def _print_json(value: Any) -> None:
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    typer.echo(json.dumps(value, indent=2))


EVAL_SHOWN = 4  # eval metrics on a job's line (posttrain jobs metrics has every one)


def _progress(job: Any) -> str:
    total = f"/{job.total_steps}" if job.total_steps else ""
    text = f"{job.id} {job.state} step {job.step}{total}"
    if job.stage:  # a pipeline job
        text += f" stage {job.stage}"
    metrics = job.metrics or {}
    for key in ("loss", "reward"):
        if isinstance(metrics.get(key), int | float):
            text += f" {key} {metrics[key]:.4g}"
    evaluation = job.eval
    if evaluation:  # the latest evaluation (status.json), each metric with the eval_ prefix of metrics.jsonl
        shown = [f"eval_{name} {value:.4g}" for name, value in (evaluation.get("metrics") or {}).items()
                 if isinstance(value, int | float)][:EVAL_SHOWN]
        text += f" | eval@{evaluation.get('step')} " + " ".join(shown)
    best = job.best
    if best:
        text += f" | best {best.get('metric')} {best.get('value'):.4g} at step {best.get('step')}"
    for warning in job.warnings or []:
        text += f"\n  warning: {warning}"
    if job.error and job.state != "succeeded":
        text += f"\n  {job.error}"
    return text


def _follow(client: Client, job_id: str, poll: float = 1.0) -> int:
    last = None
    while True:
        job = client.get_job(job_id)
        line = _progress(job)
        if line != last:
            typer.echo(line)
            last = line
        if job.state in TERMINAL:
            return 0 if job.state == "succeeded" else 1
        time.sleep(poll)


@jobs_app.command()
def submit(
    config: Annotated[Path | None, typer.Argument(help="YAML config (omit for all defaults).", show_default=False)] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="Dotted overrides: training.max_steps=200.",
                                                          show_default=False)] = None,
    priority: Annotated[int, typer.Option(help="Higher runs first.")] = 0,
    upload: Annotated[bool, typer.Option("--upload", help="Upload a local data.source file to the server first.")] = False,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Print progress until the job ends.")] = False,
    server: Server = None, api_key: ApiKey = None, as_json: AsJson = False,
) -> None:
    """Submit a job; prints its id (and with --follow, its progress; exit 1 if it does not succeed)."""
    config, overrides = split_config_and_overrides(config, overrides)
    try:
        text = config.read_text() if config is not None else ""
    except OSError as exc:
        fail(f"cannot read {config}: {exc.strerror}")
    with _connected(server, api_key) as client:
        if upload:
            overrides = _upload_data_source(client, text, str(config or "<defaults>"), overrides)
        job = client.submit(yaml=text, overrides=overrides, priority=priority)
        if as_json:
            _print_json(job)
        else:
            typer.echo(job.id)
        if follow:
            raise typer.Exit(_follow(client, job.id))


def _upload_data_source(client: Client, text: str, source: str, overrides: list[str]) -> list[str]:
    from posttrain.spec import load_yaml, spec_from_dict

    try:
        spec = spec_from_dict(load_yaml(text, source), overrides)
    except PosttrainError as exc:
        fail(exc)
    path = Path(spec.data.source).expanduser()
    if not path.is_file():
        fail(f"--upload: data.source {spec.data.source!r} is not a local file")
    info = client.upload(path)
    typer.echo(f"uploaded {path} as {info.id} ({info.size} bytes)", err=True)
    return [*overrides, f"data.source={info.source}"]


@jobs_app.command("list")
def list_jobs(
    state: Annotated[list[str] | None, typer.Option("--state", help="Only jobs in this state (repeatable).")] = None,
    limit: Annotated[int, typer.Option(help="At most this many jobs.")] = 50,
    offset: Annotated[int, typer.Option(help="Skip this many (newest first).")] = 0,
    server: Server = None, api_key: ApiKey = None, as_json: AsJson = False,
) -> None:
    """List jobs, newest first."""
    with _connected(server, api_key) as client:
        page = client.list_jobs(state, limit, offset)
    if as_json:
        _print_json(page)
        return
    typer.echo(f"{'ID':<17} {'STATE':<10} {'METHOD':<7} {'STEP':>11}  {'CREATED':<19}  NAME")
    for job in page.jobs:
        step = f"{job.step}/{job.total_steps}" if job.total_steps else str(job.step)
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.created_at))
        typer.echo(f"{job.id:<17} {job.state:<10} {job.method:<7} {step:>11}  {created:<19}  {job.name or ''}")
    if page.total > page.offset + len(page.jobs):
        typer.echo(f"({page.total - page.offset - len(page.jobs)} more; use --offset)", err=True)


@jobs_app.command()
def status(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    server: Server = None, api_key: ApiKey = None, as_json: AsJson = False,
) -> None:
    """Show a job's state, step, latest metrics and error."""
    with _connected(server, api_key) as client:
        job = client.get_job(job_id)
    if as_json:
        _print_json(job)
        return
    typer.echo(_progress(job))
    for stage in job.stages or []:  # a pipeline job's stages, in order
        total = f"/{stage.total_steps}" if stage.total_steps else ""
        typer.echo(f"  {stage.name:<16} {stage.method:<8} {stage.state:<10} step {stage.step}{total}"
                   + (f"  {stage.error}" if stage.error else ""))


@jobs_app.command()
def cancel(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the worker has stopped.")] = False,
    server: Server = None, api_key: ApiKey = None,
) -> None:
    """Cancel a queued, paused or running job (SIGTERM to its worker, SIGKILL after the grace period)."""
    with _connected(server, api_key) as client:
        job = client.cancel(job_id)
        if wait:
            job = client.wait(job_id)
    typer.echo(f"{job.id} {job.state}" + (" (stopping)" if job.state == "running" else ""))


@jobs_app.command()
def pause(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the job is paused.")] = False,
    server: Server = None, api_key: ApiKey = None,
) -> None:
    """Pause a queued or running job; `posttrain jobs resume` continues it.

    A running job's worker finishes its current step, saves a complete checkpoint (model, optimizer,
    learning-rate schedule, data position) and exits, freeing its slot; nothing is lost. A queued job is
    paused at once.
    """
    with _connected(server, api_key) as client:
        job = client.pause(job_id)
        if wait:
            job = client.wait(job_id, states={"paused", *TERMINAL})
    typer.echo(f"{job.id} {job.state}" + (" (pausing after the current step)" if job.state == "running" else ""))


@jobs_app.command()
def resume(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    server: Server = None, api_key: ApiKey = None,
) -> None:
    """Resume a paused job: it is queued again and continues from the step where it paused."""
    with _connected(server, api_key) as client:
        job = client.resume(job_id)
    typer.echo(f"{job.id} {job.state}")


@jobs_app.command()
def logs(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines until the job ends.")] = False,
    tail: Annotated[int, typer.Option(help="Lines from the end.")] = 200,
    server: Server = None, api_key: ApiKey = None,
) -> None:
    """Print the worker's log."""
    with _connected(server, api_key) as client:
        lines = client.follow_logs(job_id, tail) if follow else client.logs(job_id, tail)
        for line in lines:
            typer.echo(line)


@jobs_app.command()
def metrics(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    server: Server = None, api_key: ApiKey = None,
) -> None:
    """Print the job's metrics, one JSON object per logging step (evaluations: "kind": "eval")."""
    with _connected(server, api_key) as client:
        records = client.metrics(job_id)
    for record in records:
        typer.echo(json.dumps(record))


@jobs_app.command("eval")
def evaluation(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    step: Annotated[int | None, typer.Option(help="The evaluation whose answers to show (default: the latest).")] = None,
    server: Server = None, api_key: ApiKey = None, as_json: AsJson = False,
) -> None:
    """Show the job's latest evaluation, its best checkpoint, and the answers of one evaluation."""
    with _connected(server, api_key) as client:
        report = client.evaluation(job_id, step)
    if as_json:
        _print_json(report)
        return
    if report.eval is None:
        typer.echo(f"{job_id}: no evaluation yet")
        return
    final = " (final)" if report.eval.get("final") else ""
    typer.echo(f"{job_id} eval at step {report.eval.get('step')}{final}")
    for name, value in (report.eval.get("metrics") or {}).items():
        typer.echo(f"  eval_{name:<28} {value:.4g}" if isinstance(value, int | float) else f"  eval_{name} {value}")
    if report.best:
        typer.echo(f"best: {report.best.get('metric')} {report.best.get('value'):.4g} at step "
                   f"{report.best.get('step')} ({report.best.get('checkpoint')})")
    if report.step is not None:
        typer.echo(f"answers at step {report.step} (of steps {', '.join(map(str, report.steps))}):")
    for answer in report.answers:
        prompt = answer.get("prompt")
        question = prompt[-1].get("content") if isinstance(prompt, list) and prompt else prompt
        typer.echo(f"  [{answer.get('set')}] {json.dumps(question)} -> {json.dumps(answer.get('answer'))} "
                   f"(reference {json.dumps(answer.get('reference'))}, {json.dumps(answer.get('scores'))})")


@jobs_app.command()
def artifacts(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    server: Server = None, api_key: ApiKey = None, as_json: AsJson = False,
) -> None:
    """List checkpoints and final output with sizes."""
    with _connected(server, api_key) as client:
        listing = client.artifacts(job_id)
    if as_json:
        _print_json(listing)
        return
    for entry in listing.artifacts:
        typer.echo(f"{entry.size:>12}  {entry.path}")
    typer.echo(f"{listing.total_size:>12}  total ({len(listing.checkpoints)} checkpoints, "
               f"final: {'yes' if listing.final else 'no'})")


@jobs_app.command()
def download(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    path: Annotated[str, typer.Argument(help="A file, or a folder such as final or checkpoints/checkpoint-10.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write (a folder for several files).")] = Path("."),
    server: Server = None, api_key: ApiKey = None,
) -> None:
    """Download one artifact file, or every file under a folder of the job."""
    prefix = path.strip("/")
    with _connected(server, api_key) as client:
        listed = [a.path for a in client.artifacts(job_id).artifacts]
        under = [p for p in listed if p.startswith(prefix + "/")]
        if under:  # a folder: keep its layout below OUTPUT, and never write outside it
            targets = [(item, inside(output, item)) for item in under]
            for item, target in targets:
                client.download(job_id, item, target)
            typer.echo(f"{len(under)} files -> {output / prefix}")
            return
        dest = output / Path(prefix).name if output.is_dir() else output
        client.download(job_id, prefix, dest)
        typer.echo(str(dest))


def inside(folder: Path, relative: str) -> Path:
    """``folder / relative``, refused (as a one-line error) unless it stays inside ``folder``: the file
    names come from the server, and a path such as ``final/../../.bashrc`` must not write elsewhere."""
    parts = relative.replace("\\", "/").split("/")
    target = (folder / relative).resolve()
    if relative.startswith("/") or ".." in parts or not target.is_relative_to(folder.resolve()):
        fail(f"the server listed an artifact path {relative!r} that leads outside {folder}; nothing downloaded",
             EXIT_FAILED)
    return folder / relative


@jobs_app.command()
def delete(
    job_id: Annotated[str, typer.Argument(help="Job id.")],
    server: Server = None, api_key: ApiKey = None,
) -> None:
    """Delete a finished job and its files."""
    with _connected(server, api_key) as client:
        client.delete(job_id)
    typer.echo(f"{job_id} deleted")


@jobs_app.command("upload")
def upload_file(
    path: Annotated[Path, typer.Argument(help="A dataset file.")],
    server: Server = None, api_key: ApiKey = None,
) -> None:
    """Upload a dataset file; prints the data.source value that refers to it."""
    if not path.is_file():
        fail(f"{path} is not a file")
    with _connected(server, api_key) as client:
        info = client.upload(path)
    typer.echo(info.source)


@jobs_app.command()
def models(server: Server = None, api_key: ApiKey = None, as_json: AsJson = False) -> None:
    """List the models the server serves you: its base models, your fine-tuned models and checkpoints
    (call them with OpenAI's SDK at <server>/v1, or `posttrain chat MODEL --server <server>`)."""
    with _connected(server, api_key) as client:
        listed = client.list_models()
    if as_json:
        _print_json(listed)
        return
    for model in listed:
        typer.echo(f"{model['id']}  ({model.get('kind', 'model')}, owned by {model['owned_by']})")


def serve(
    host: Annotated[str, typer.Option(help="Address to bind; non-loopback needs --api-key-file or --insecure.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = DEFAULT_PORT,
    data_dir: Annotated[Path, typer.Option(help="Job directories, uploads and the SQLite database.")] = Path(DEFAULT_DATA_DIR),
    db: Annotated[str | None, typer.Option(envvar="POSTTRAIN_DB", show_envvar=True,
                                           help="Database URL (default: SQLite in the data dir), e.g. "
                                                "postgresql+psycopg://user@host/db. Put one with a password "
                                                "in POSTTRAIN_DB rather than on the command line.")] = None,
    slots: Annotated[int, typer.Option(help="Jobs running at once (one per device).")] = 1,
    devices: Annotated[str | None, typer.Option(help="Comma-separated CUDA_VISIBLE_DEVICES value per slot, "
                                                    "e.g. '0,1' for two GPUs (sets --slots).")] = None,
    api_key_file: Annotated[Path | None, typer.Option(help="File of API keys, one per line: 'KEY [OWNER [admin]]' "
                                                           "(KEY itself or sha256:HEX of it).")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Allow a non-loopback bind without API keys.")] = False,
    allow_user_code: Annotated[bool, typer.Option(
        "--allow-user-code", help="With API keys, let jobs run code they bring (model.trust_remote_code, "
        "'module:function' rewards): every key holder can then run code as this server's user.")] = False,
    allow_host: Annotated[list[str] | None, typer.Option(
        "--allow-host", help="Without API keys, a Host name to answer besides localhost/127.0.0.1/[::1] "
        "(repeatable; guards against DNS rebinding).")] = None,
    allow_path: Annotated[list[Path] | None, typer.Option(
        "--allow-path", help="With API keys, a server folder jobs may read data or models from (repeatable); "
        "otherwise only uploads.")] = None,
    allow_network_host: Annotated[list[str] | None, typer.Option(
        "--allow-network-host", help="With API keys, a host besides loopback that jobs may connect to "
        "(online_grpo's api_url/inference_host, distributed.rdzv_endpoint; repeatable).")] = None,
    max_processes_per_job: Annotated[int | None, typer.Option(
        help="With API keys, most processes (nproc_per_node x nnodes) a torchrun job may start "
             "(default: this machine's CPU or GPU count).")] = None,
    max_restarts_per_job: Annotated[int, typer.Option(
        help="With API keys, largest distributed.max_restarts a job may ask for.")] = 3,
    max_retries: Annotated[int, typer.Option(help="Requeues of a job whose worker died before giving up.")] = 2,
    cancel_grace: Annotated[float, typer.Option(help="Seconds between SIGTERM and SIGKILL on cancel.")] = 30.0,
    max_upload_mb: Annotated[int, typer.Option(help="Largest dataset upload, in MiB.")] = 1024,
    max_body_mb: Annotated[int, typer.Option(help="Largest JSON/YAML request body, in MiB.")] = 8,
    max_log_followers: Annotated[int, typer.Option(help="Log streams (logs --follow) open at once.")] = 32,
    warm_workers: Annotated[bool, typer.Option(
        "--warm-workers/--no-warm-workers", help="Fork workers from a process that has already imported "
        "torch/transformers/TRL (start in well under a second); off: each worker starts a fresh Python.")] = True,
    inference_threads: Annotated[int | None, typer.Option(
        help="torch threads of the inference worker (OpenAI chat/completions; default 1 on CPU). Training jobs "
             "use their own (training.num_threads): on a CPU machine keep the two within its cores.")] = None,
    inference_device: Annotated[str, typer.Option(
        help="Device of the inference worker: auto, cpu, cuda, cuda:N (only GPU N) or mps. Give it a GPU no "
             "training slot uses (--devices).")] = "auto",
    inference_memory_mb: Annotated[int, typer.Option(
        help="Memory the inference worker's loaded models may take; the least recently used model or adapter "
             "is unloaded to make room.")] = 4096,
    inference_dtype: Annotated[str, typer.Option(
        help="auto (bfloat16 on a GPU or a CPU with native bf16 such as AMX, else float32), float32, bfloat16 "
             "or float16.")] = "auto",
    inference_backend: Annotated[str, typer.Option(
        help="What answers /v1/chat/completions: posttrain (its own engine, CPU or GPU) or vllm (`vllm serve "
             "--enable-lora` per base model: a CUDA GPU with vLLM installed).")] = "posttrain",
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Run the job service (REST API on port 8322, OpenAPI at /openapi.json; OpenAI fine-tuning and
    inference under /v1)."""
    import logging

    import uvicorn

    from posttrain.service.app import create_app
    from posttrain.service.auth import load_api_keys

    api_keys = {}
    if api_key_file is not None:
        try:
            api_keys = load_api_keys(api_key_file)
        except (OSError, ValueError) as exc:
            fail(str(exc))
    if not is_loopback(host) and not api_keys and not insecure:
        fail(f"refusing to listen on {host} without API keys: anyone who can reach it could run code on "
              "this machine. Pass --api-key-file KEYS (or --insecure on a trusted network).")
    hosts = list(allow_host or [])
    if not api_keys and not is_loopback(host) and host not in ("0.0.0.0", "::", ""):
        hosts.append(host)  # an --insecure server answers requests addressed to the address it binds
    device_list = [d.strip() for d in devices.split(",")] if devices else None
    try:
        settings = ServiceSettings(
            data_dir=data_dir, db_url=db, slots=len(device_list) if device_list else slots, devices=device_list,
            api_keys=api_keys, max_retries=max_retries, cancel_grace_s=cancel_grace,
            max_upload_bytes=max_upload_mb * MiB, max_body_bytes=max_body_mb * MiB,
            allowed_paths=list(allow_path or []), allow_user_code=allow_user_code, allowed_hosts=hosts,
            max_log_followers=max_log_followers, warm_workers=warm_workers,
            allowed_network_hosts=list(allow_network_host or []), max_processes_per_job=max_processes_per_job,
            max_restarts_per_job=max_restarts_per_job, inference_threads=inference_threads,
            inference_device=inference_device, inference_memory_mb=inference_memory_mb,
            inference_dtype=inference_dtype, inference_backend=inference_backend,
        )
        if settings.inference_backend == "vllm":
            from posttrain.service.vllm_backend import check_vllm

            check_vllm(settings)
        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        app = create_app(settings)
    except (ValueError, OSError, RuntimeError, PosttrainError) as exc:  # bad settings, data dir in use, no vLLM
        fail(exc)
    except Exception as exc:  # e.g. an unreachable database URL
        fail(f"cannot start: {type(exc).__name__}: {exc}")
    owners = len({principal.owner for principal in api_keys.values()})
    auth = f"on, {owners} owner(s)" if api_keys else "off, loopback Host names only"
    code = "allowed" if settings.runs_user_code else "refused (--allow-user-code to allow)"
    typer.echo(f"posttrain service on http://{host}:{port} (data: {settings.data_dir}, slots: {settings.slots}, "
               f"auth: {auth}, user code: {code})", err=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level.lower(), timeout_graceful_shutdown=5)
    sys.stdout.flush()
