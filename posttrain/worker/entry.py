"""The worker process: ``python -m posttrain.worker --spec spec.json --job-dir DIR [--resume] [--no-log-file]``.

Every launcher ends here (a subprocess, a fork of the warm template, each rank under torchrun); exit codes
are :mod:`posttrain.job.result`'s. A spec.json that holds a pipeline plan is handed to the pipeline runner
(``python -m posttrain.pipeline``, same arguments, same process), which runs each stage through this worker.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from posttrain.errors import PosttrainError
from posttrain.job.directory import JobDir
from posttrain.job.ranks import launcher_pid, record_status
from posttrain.job.result import EXIT_BAD_INPUT, EXIT_OK
from posttrain.job.signals import acknowledge_stops
from posttrain.spec import is_plan, load_yaml, spec_from_dict
from posttrain.worker.run import run_worker

PLAN_RUNNER_MODULE = "posttrain.pipeline"


def worker_arguments(prog: str, description: str | None) -> argparse.ArgumentParser:
    """The command line of the worker, which every program that stands in for it (the KFP driver, the
    pipeline runner) shares."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", required=True, help="JobSpec JSON (or YAML) file")
    parser.add_argument("--job-dir", required=True, help="job directory to write")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    parser.add_argument("--no-log-file", action="store_true",
                        help="do not write worker.log (the launcher already captures stdout/stderr there)")
    return parser


def stopped_before_restart(jd: JobDir) -> str | None:
    """A pause or cancel ends every rank with a non-zero code, which torchrun (with max_restarts) takes for a
    failure and restarts the ranks: such a restart must not train on. Its state, or None to run."""
    from posttrain.distributed.runtime import restarted_by_torchrun

    status = jd.read_status() if restarted_by_torchrun() else None
    return status.state if status is not None and status.state in ("paused", "cancelled") else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = worker_arguments("python -m posttrain.worker", __doc__).parse_args(argv)
    jd = JobDir(args.job_dir).create()
    acknowledge_stops(jd, launcher_pid())
    stopped = stopped_before_restart(jd)
    if stopped is not None:
        print(f"the run was {stopped}: torchrun's restart of its ranks ends here", file=sys.stderr)
        return EXIT_OK  # exit 0, so that torchrun (max_restarts) does not restart them again
    try:
        data = load_yaml(Path(args.spec).read_text(), args.spec)
        if is_plan(data):
            # The same process (pid, process group, signals) becomes the pipeline runner.
            sys.stdout.flush()
            sys.stderr.flush()
            os.execv(sys.executable, [sys.executable, "-m", PLAN_RUNNER_MODULE, *argv])
        spec = spec_from_dict(data)
    except (OSError, PosttrainError) as exc:
        message = exc.message if isinstance(exc, PosttrainError) else f"cannot read spec {args.spec}: {exc}"
        print(f"error: {message}", file=sys.stderr)
        record_status(jd, state="failed", error=message)
        return EXIT_BAD_INPUT
    try:
        result = run_worker(spec, jd.root, resume=args.resume, log_to_file=not args.no_log_file)
    except PosttrainError as exc:  # the directory holds another run: report it, change nothing
        print(f"error: {exc.message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return result.exit_code
