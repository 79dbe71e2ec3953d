"""The single worker entrypoint every launcher runs.

    python -m posttrain.worker --spec spec.json --job-dir DIR [--resume] [--no-log-file]

It owns the job-directory contract (see :mod:`posttrain.jobdir`): writes spec.json, keeps status.json
and metrics.jsonl current, marks complete checkpoints, writes final/ atomically.

Signals: SIGINT/SIGTERM cancel at the next step boundary (a second one stops at once); SIGUSR1 pauses:
at the next step boundary it saves a complete checkpoint, records ``paused`` and exits, and ``--resume``
continues from that checkpoint. A pause never interrupts anything (a repeated SIGUSR1 changes nothing);
a cancel replaces a pending pause. Started by a launcher (this module's ``main``), the worker acknowledges
each first cancel or pause in ``stop-received.json`` as it receives it: the service re-sends a signal
only while it is unacknowledged, so its re-sends never count as the second, "at once" cancel.

Exit codes: 0 succeeded, 1 failed, 2 rejected input (status says why), 130/143 cancelled by
SIGINT/SIGTERM, 75 paused (EX_TEMPFAIL: "continue later").
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.errors import ConfigError, PosttrainError
from posttrain.jobdir import JobDir, StopReceived
from posttrain.spec import JobSpec, spec_from_dict, spec_to_json

log = logging.getLogger("posttrain.worker")

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_CANCELLED = {"SIGINT": 130, "SIGTERM": 143}
EXIT_PAUSED = 75
PAUSE_SIGNAL = signal.SIGUSR1  # what the service (or a user: kill -USR1) sends to pause a run


def exit_code_for(state: str, cancelled_by: str | None, input_error: bool) -> int:
    """The process exit code of a run that ended in ``state`` (launchers and torchrun read it)."""
    if state == "succeeded":
        return EXIT_OK
    if state == "paused":
        return EXIT_PAUSED
    if state == "cancelled":
        return EXIT_CANCELLED.get(cancelled_by or "SIGTERM", 143)
    return EXIT_BAD_INPUT if input_error else EXIT_FAILED


@dataclass
class JobResult:
    """What a finished worker reports back to its caller (the CLI prints it as the summary)."""

    state: str
    job_dir: Path
    step: int = 0
    total_steps: int | None = None
    final_loss: float | None = None
    runtime_s: float = 0.0
    tokens_per_s: float | None = None
    final_dir: Path | None = None
    error: str | None = None
    cancelled_by: str | None = None
    input_error: bool = False
    metrics: dict[str, Any] = field(default_factory=dict)
    # A pause that arrived on the last step: the run just finished, and a caller with more to run (a
    # pipeline's next stage) pauses before it.
    pause_pending: bool = False

    @property
    def exit_code(self) -> int:
        return exit_code_for(self.state, self.cancelled_by, self.input_error)


def setup_logging(job_dir: JobDir | None, to_file: bool) -> None:
    root = logging.getLogger("posttrain")
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        if getattr(handler, "_posttrain", False):
            root.removeHandler(handler)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if to_file and job_dir is not None:
        handlers.append(logging.FileHandler(job_dir.log_path))
    rank = int(os.environ.get("RANK", "0") or 0)
    if rank and job_dir is not None:
        # Under torchrun, rank 0 logs as a single worker does; every other rank to worker.rankN.log only.
        handlers = [logging.FileHandler(job_dir.root / f"worker.rank{rank}.log")]
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler._posttrain = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.propagate = False
    # bitsandbytes warns on every import that an optional hub-downloaded CPU kernel is absent; the
    # built-in kernel it falls back to is what we test with, so the warning is noise to users.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # TRL 1.16 still calls the renamed transformers 5 API; nothing a user can do about it.
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
    if not sys.stderr.isatty():
        # Progress bars written to a log file are a wall of carriage returns; log lines say the same.
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


_acknowledgements: tuple[JobDir, int] | None = None  # set by acknowledge_stops


def acknowledge_stops(job_dir: JobDir, pid: int) -> None:
    """From now on, record each stop request this process receives in ``job_dir`` (the one the service
    watches) for ``pid`` (the process the service signals for the job). Called once by the programs a
    launcher starts (this module's main, the KFP driver): a signal belongs to the process, not to one run,
    so a pipeline's stages acknowledge into the pipeline's directory. Through run_worker alone (`posttrain
    train` on one process, the Python API, a KFP step), nothing is recorded: nobody re-sends signals there."""
    global _acknowledgements
    _acknowledgements = (job_dir, pid)


def acknowledge_stop(request: str, signal_name: str) -> None:
    """Called by signal handlers, before they act on a first cancel or pause: after it, the service does not
    re-send that signal. Best effort (an unwritable job dir only means a re-send)."""
    if _acknowledgements is None or not is_main_process():
        return
    job_dir, pid = _acknowledgements
    try:
        job_dir.record_stop_received(StopReceived(pid=pid, request=request, signal=signal_name))
    except OSError as exc:
        log.warning("could not record the %s request in %s: %s", request, job_dir.stop_received_path, exc)


def _install_signal_handlers(stop) -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}

    def handle(signum, _frame):
        name = signal.Signals(signum).name
        if signum == PAUSE_SIGNAL:
            # A pause must not lose work: it never interrupts, and a repeat (the service re-sends it until it
            # sees it acknowledged) or one after a cancel changes nothing.
            if not stop.is_set():
                acknowledge_stop("pause", name)
                log.warning("%s received: pausing after the current step, with a checkpoint", name)
                stop.set(name)
            return
        if stop.is_set() and not stop.pausing:
            # A second signal means "now": unwind immediately; the finally-block still records the state.
            raise KeyboardInterrupt(name)
        # Acknowledged first: a signal arriving while this runs is still taken for the first one.
        acknowledge_stop("cancel", name)
        log.warning("%s received: stopping after the current step (send again to stop at once)", name)
        stop.set(name)  # a cancel replaces a pending pause

    for signum in (signal.SIGINT, signal.SIGTERM, PAUSE_SIGNAL):
        previous[signum] = signal.signal(signum, handle)
    return previous


def _restore_signal_handlers(previous: dict[int, Any], signums: tuple[int, ...]) -> None:
    for signum in signums:
        if signum in previous:
            signal.signal(signum, previous[signum])


def is_main_process() -> bool:
    """Rank 0 writes the job directory; other ranks of a distributed run (torchrun sets RANK) only train."""
    dist = sys.modules.get("torch.distributed")  # not imported: no process group can have been set up
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0") or 0) == 0


def _record(jd: JobDir, **changes: Any) -> None:
    """Update status.json, on rank 0 only."""
    if is_main_process():
        jd.update_status(**changes)


def _save_final(trainer, tokenizer, job_dir: JobDir) -> Path:
    """Save the adapter (or full model) + tokenizer to final/ via a temp folder and a rename. Every rank
    calls the trainer's save (a sharded model gathers its weights there); only rank 0 writes files."""
    final = job_dir.final_dir
    main = is_main_process()
    tmp = job_dir.root / ".final.partial"  # one name for every rank
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        trainer.save_model(str(tmp))
        if not main:
            return final
        tokenizer.save_pretrained(str(tmp))
        # Move an old final/ aside rather than deleting it first: a crash in between must not leave
        # the directory without any final/.
        old = job_dir.root / ".final.old"
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def check_fresh_job_dir(job_dir: JobDir) -> None:
    if job_dir.checkpoints(complete_only=False) or job_dir.final_dir.exists():
        raise ConfigError(
            f"{job_dir.root} already holds a run (checkpoints or final/); use --resume to continue it, "
            "or choose another output.dir"
        )


def run_worker(spec: JobSpec, job_dir: str | Path, resume: bool = False, log_to_file: bool = True,
               extra_callbacks: Sequence[Any] = (), recorded_spec: JobSpec | None = None) -> JobResult:
    """Run one job to its end and record it in ``job_dir``.

    ``extra_callbacks`` are ``transformers.TrainerCallback`` objects added after posttrain's own (Python API
    users and the benchmark, which times every variant with the same callback). ``recorded_spec``: what
    spec.json says when it is not ``spec`` itself (a KFP train step runs the job's spec on prepared data).

    Never raises for job failures; raises ConfigError, touching nothing, when ``job_dir`` already
    holds another run and ``resume`` is not set.
    """
    from posttrain.distributed.runtime import launcher_pid, leave_process_group, restarted_by_torchrun

    jd = JobDir(job_dir)
    resume = resume or restarted_by_torchrun()  # torchrun's elastic restart continues the run
    if not resume:
        check_fresh_job_dir(jd)
    jd.create()
    setup_logging(jd, log_to_file)
    from posttrain.callbacks import StopRequest  # imports transformers: after logging is set up

    stop = StopRequest()
    previous_handlers = _install_signal_handlers(stop)
    started = time.perf_counter()
    result = JobResult(state="failed", job_dir=jd.root)
    status = jd.read_status()
    attempt = (status.attempt + 1) if status else 1
    try:
        spec = spec.model_copy(update={"output": spec.output.model_copy(update={"dir": str(jd.root)})})
        if is_main_process():
            recorded = recorded_spec or spec
            jd.write_spec(spec_to_json(recorded.model_copy(update={"output": spec.output})))
        _record(jd, state="running", pid=launcher_pid(), attempt=attempt, error=None, finished_at=None)
        result = _train(spec, jd, resume, stop, result, extra_callbacks)
    except KeyboardInterrupt as exc:
        result.state, result.cancelled_by = "cancelled", str(exc) or "SIGINT"
    except PosttrainError as exc:
        log.error("%s", exc.message)
        result.state, result.error, result.input_error = "failed", exc.message, True
    except Exception as exc:
        log.error("training failed:\n%s", traceback.format_exc())
        result.state, result.error = "failed", f"{type(exc).__name__}: {exc}"
    finally:
        _restore_signal_handlers(previous_handlers, (signal.SIGINT, signal.SIGTERM))
        result.runtime_s = time.perf_counter() - started
        # A pause is recorded by _train; a failure while pausing is a real failure, not a pause.
        if stop.is_set() and not stop.pausing and result.state != "succeeded":
            result.state, result.cancelled_by = "cancelled", stop.signal_name
        try:
            status = jd.read_status()
            result.step = status.step if status else result.step
            _record(jd, state=result.state, error=result.error, step=result.step)
        finally:
            # Only now: until the end is recorded, status.json says "running" with this pid, which tells the
            # service it may send a pause, and SIGUSR1's default action would kill the process.
            _restore_signal_handlers(previous_handlers, (PAUSE_SIGNAL,))
        # After the restore: a pause arriving later reaches the previous handler (a pipeline's) instead.
        result.pause_pending = result.state == "succeeded" and stop.is_set() and stop.pausing
        leave_process_group()
    return result


def _train(spec: JobSpec, jd: JobDir, resume: bool, stop, result: JobResult,
           extra_callbacks: Sequence[Any] = ()) -> JobResult:
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback
    from transformers.trainer_callback import ProgressCallback as HFProgressCallback

    from posttrain.callbacks import JobDirCallback, ProgressCallback
    from posttrain.data import load_training_data
    from posttrain.distributed.runtime import barrier, init_process_group
    from posttrain.modeling import apply_threads, load_tokenizer, resolve_placement
    from posttrain.preflight import check_options
    from posttrain.recipes import RecipeInputs, build_trainer

    check_options(spec, warnings := [], import_rewards=True)
    for warning in warnings:
        log.warning("%s", warning)
    placement = resolve_placement(spec.model)
    threads = apply_threads(spec.training.num_threads, placement.device)
    under_torchrun = spec.distributed.launcher == "torchrun"
    rank_info = init_process_group(spec, placement.device) if under_torchrun else None
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(jd.tensorboard_dir)
    set_seed(spec.training.seed)
    log.info("job %s: method=%s model=%s device=%s dtype=%s threads=%d", spec.name or jd.root.name,
             spec.method.name, spec.model.name_or_path, placement.device, str(placement.dtype).removeprefix("torch."),
             threads)

    if spec.method.name == "online_grpo":  # its rollouts come from a trajectory API, not from data.*
        from posttrain.rl.trainer import train_online

        return train_online(spec, jd, resume, stop, result, placement)
    if spec.method.name == "ppo":  # samples its own rollouts from prompt rows; not a TRL recipe
        from posttrain.rl.ppo_trainer import train_ppo

        return train_ppo(spec, jd, resume, stop, result, placement)
    data = load_training_data(spec.data, spec.method.name, seed=spec.training.seed)
    if data.skipped:
        log.warning("skipped %d malformed rows of %s (data.on_bad_row=skip)", data.skipped, data.source)
    log.info("data: %d training rows (%s format)%s", len(data.train), data.format,
             f", {len(data.eval)} validation rows" if data.eval is not None else "")
    tokenizer = load_tokenizer(spec)
    metrics_cb = JobDirCallback(jd, stop, {"num_threads": threads, "dtype": str(placement.dtype).removeprefix("torch.")})
    callbacks = [metrics_cb, ProgressCallback(metrics_cb, f"{spec.method.name}"), *extra_callbacks]
    trainer = build_trainer(RecipeInputs(spec, jd, placement, data, tokenizer, callbacks))
    for unwanted in (PrinterCallback, HFProgressCallback):
        trainer.remove_callback(unwanted)
    if rank_info is not None:
        from posttrain.distributed.trainer import prepare_trainer

        prepare_trainer(trainer, spec, rank_info, placement.device)
    if stop.is_set():
        result.state = stop.outcome
        return result

    checkpoint = None
    if resume:
        if is_main_process():  # one rank tidies the job directory; the others wait for it
            for path in jd.remove_incomplete_checkpoints():
                log.warning("removed incomplete checkpoint %s", path.name)
        barrier()
        checkpoint = jd.latest_checkpoint()
        log.info("resuming from %s", checkpoint if checkpoint else "the start (no complete checkpoint yet)")
        if is_main_process():
            jd.truncate_metrics(jd.checkpoint_step(checkpoint) if checkpoint else 0)
        if rank_info is None and checkpoint is not None:
            from posttrain.distributed.checkpoint import (
                is_distributed_checkpoint,
                use_distributed_checkpoints,
            )

            if is_distributed_checkpoint(checkpoint):  # a torchrun run's checkpoint, resumed on one process
                use_distributed_checkpoints(trainer)
    output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)

    result.step = trainer.state.global_step
    result.total_steps = trainer.state.max_steps
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    result.final_loss = losses[-1] if losses else output.training_loss
    result.tokens_per_s = metrics_cb.tokens_per_s
    result.metrics = dict(output.metrics)
    finished = result.total_steps is not None and result.step >= result.total_steps
    if stop.is_set() and not (stop.pausing and finished):  # a pause on the last step just finishes
        result.state, result.cancelled_by = stop.outcome, stop.signal_name
        return result
    if spec.output.save_final:
        result.final_dir = _save_final(trainer, tokenizer, jd)
    _record(jd, step=result.step, total_steps=result.total_steps)
    result.state = "succeeded"
    return result


def _stopped_before_restart(jd: JobDir) -> str | None:
    """A pause or cancel ends every rank with a non-zero code, which torchrun (with max_restarts) takes for a
    failure and restarts the ranks: such a restart must not train on. Its state, or None to run."""
    from posttrain.distributed.runtime import restarted_by_torchrun

    status = jd.read_status() if restarted_by_torchrun() else None
    return status.state if status is not None and status.state in ("paused", "cancelled") else None


def worker_arguments(prog: str, description: str | None) -> argparse.ArgumentParser:
    """The command line of the worker, which every program that stands in for it (the KFP driver) shares."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", required=True, help="JobSpec JSON (or YAML) file")
    parser.add_argument("--job-dir", required=True, help="job directory to write")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    parser.add_argument("--no-log-file", action="store_true",
                        help="do not write worker.log (the launcher already captures stdout/stderr there)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = worker_arguments("python -m posttrain.worker", __doc__).parse_args(argv)
    jd = JobDir(args.job_dir).create()
    from posttrain.distributed.runtime import launcher_pid

    acknowledge_stops(jd, launcher_pid())
    stopped = _stopped_before_restart(jd)
    if stopped is not None:
        print(f"the run was {stopped}: torchrun's restart of its ranks ends here", file=sys.stderr)
        return EXIT_OK  # exit 0, so that torchrun (max_restarts) does not restart them again
    try:
        from posttrain.pipeline import is_plan, run_plan_file
        from posttrain.spec import load_yaml

        data = load_yaml(Path(args.spec).read_text(), args.spec)
        if is_plan(data):  # a pipeline: its stages run one by one through run_worker, in this process
            return run_plan_file(Path(args.spec), jd.root, args.resume, not args.no_log_file).exit_code
        spec = spec_from_dict(data)
    except (OSError, PosttrainError) as exc:
        message = exc.message if isinstance(exc, PosttrainError) else f"cannot read spec {args.spec}: {exc}"
        print(f"error: {message}", file=sys.stderr)
        _record(jd, state="failed", error=message)
        return EXIT_BAD_INPUT
    try:
        result = run_worker(spec, jd.root, resume=args.resume, log_to_file=not args.no_log_file)
    except PosttrainError as exc:  # the directory holds another run: report it, change nothing
        print(f"error: {exc.message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
