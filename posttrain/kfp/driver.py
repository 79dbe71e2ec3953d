"""The process a service job with ``distributed.launcher=kfp`` runs: the job's pipeline under kfp.local.

    python -m posttrain.kfp.driver --spec spec.json --job-dir DIR [--resume] [--no-log-file]

Same arguments, job directory and exit codes as ``python -m posttrain.worker``, so the service's launcher,
scheduler, cancel and recovery treat it like any worker. The pipeline's steps are its children in its
process group: a cancel (SIGTERM to the group) reaches the train step, which stops at the next step
boundary and records ``cancelled``; this process waits for that rather than dying first. A pause
(SIGUSR1, sent to this process only) is passed on to the train step, which checkpoints and records
``paused``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

from posttrain.errors import PosttrainError
from posttrain.job.directory import JobDir
from posttrain.job.result import EXIT_BAD_INPUT, exit_code_for
from posttrain.job.signals import PAUSE_SIGNAL, acknowledge_stop, acknowledge_stops
from posttrain.spec import load_yaml, spec_from_dict
from posttrain.worker.entry import worker_arguments

STEP_MODULE = "kfp.dsl.executor_main"  # what kfp.local runs for each step


def _step_processes() -> list:
    import psutil

    found = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if any(STEP_MODULE in part for part in child.cmdline()):
                found.append(child)
    return found


class _Cancel:
    signal_name: str | None = None  # set once SIGTERM/SIGINT arrived


def _install_handlers() -> None:
    def pass_pause_on(signum, _frame) -> None:
        steps = _step_processes()
        for process in steps:
            with contextlib.suppress(Exception):
                process.send_signal(PAUSE_SIGNAL)
        if steps:  # else unacknowledged: the service sends it again, when a step may be there to take it
            acknowledge_stop("pause", signal.Signals(signum).name)

    def wait_for_steps(signum, _frame) -> None:
        # The group's signal reached the steps too; their worker records the cancel, we wait for it.
        if _Cancel.signal_name is None:
            acknowledge_stop("cancel", signal.Signals(signum).name)
        _Cancel.signal_name = signal.Signals(signum).name
        print(f"posttrain.kfp.driver: {signal.Signals(signum).name} received, waiting for the steps to stop",
              file=sys.stderr, flush=True)

    signal.signal(PAUSE_SIGNAL, pass_pause_on)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, wait_for_steps)


def exit_code(jd: JobDir) -> int:
    """The worker's exit code for the state the steps recorded (a cancel reaches them as SIGTERM; a
    prepare-data failure is bad input)."""
    status = jd.read_status()
    state = status.state if status else "failed"
    input_error = bool(status and status.error and status.error.startswith("prepare-data:"))
    return exit_code_for(state, "SIGTERM", input_error)


def main(argv: list[str] | None = None) -> int:
    args = worker_arguments("python -m posttrain.kfp.driver", __doc__).parse_args(argv)
    jd = JobDir(Path(args.job_dir).resolve()).create()
    acknowledge_stops(jd, os.getpid())  # the service signals this process, not the steps
    try:
        spec = spec_from_dict(load_yaml(Path(args.spec).read_text(), args.spec))
    except (OSError, PosttrainError) as exc:
        message = exc.message if isinstance(exc, PosttrainError) else f"cannot read spec {args.spec}: {exc}"
        print(f"error: {message}", file=sys.stderr)
        jd.update_status(state="failed", error=message)
        return EXIT_BAD_INPUT
    from posttrain.kfp.pipeline import require_kfp
    from posttrain.kfp.runs import run_local

    try:
        require_kfp()
    except PosttrainError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        jd.update_status(state="failed", error=exc.message)
        return EXIT_BAD_INPUT
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _install_handlers()
    try:
        run_local(spec, jd.root, resume=args.resume, log_file=not args.no_log_file,
                  stop_requested=lambda: _Cancel.signal_name is not None)
    except PosttrainError as exc:  # the directory holds another run: report it, change nothing
        print(f"error: {exc.message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return exit_code(jd)


if __name__ == "__main__":
    sys.exit(main())
