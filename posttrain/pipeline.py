"""Pipelines: several JobSpecs run one after the other, each stage's output feeding the next.

A pipeline file is YAML with a ``stages:`` list; each stage is ``{name: ..., <JobSpec sections>}``, and an
optional ``defaults:`` section is merged under every stage. A string anywhere in a stage may name an earlier
stage's output: ``${stages.<name>.final}`` (its trained adapter or model) or ``${stages.<name>.dir}`` (its
job directory). Every stage is validated before anything runs, then planned into a :class:`Pipeline`:
concrete JobSpecs, one job directory each under the pipeline's own (``<dir>/<stage>/``).

Running a pipeline is running each stage's JobSpec through :func:`posttrain.worker.run_worker`, the path of
``posttrain train``; there is no second runner. The pipeline's directory is itself a job directory: its
spec.json holds the plan, its status.json the pipeline's state with the current stage and every stage's
progress, its metrics.jsonl every stage's metrics tagged with the stage. A rerun skips the stages that
already succeeded (with the same spec); ``--resume`` resumes the one that was interrupted. The job service
runs the same plan as one job: its worker sees a plan in spec.json and hands the process over to :func:`main`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.errors import ConfigError, PosttrainError
from posttrain.job.directory import TERMINAL_STATES, JobDir, atomic_write_text
from posttrain.job.result import exit_code_for
from posttrain.job.signals import CANCEL_SIGNALS, PAUSE_SIGNAL, acknowledge_stop, acknowledge_stops
from posttrain.job_paths import absolute, bind_job_dir
from posttrain.spec import (
    PLAN_KEY,
    JobSpec,
    apply_overrides,
    check_depth,
    closest_name,
    load_yaml,
    spec_from_dict,
    spec_to_json,
)

log = logging.getLogger("posttrain.pipeline")

TOP_LEVEL_KEYS = ("name", "output_dir", "defaults", "stages")
# A stage name is a folder name and one part of a dotted override (stages.<name>.a.b=c): no dots.
STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
# Names the pipeline's own job directory already uses for its files.
RESERVED_NAMES = frozenset({"checkpoints", "final", "tensorboard"})
REFERENCE = re.compile(r"\$\{([^}]*)\}")
REFERENCE_KINDS = {"final": "its final/ (trained adapter or model)", "dir": "its job directory"}
MIRROR_INTERVAL_S = 1.0


@dataclass
class Stage:
    """One planned stage: a concrete JobSpec (references resolved, output.dir set) and the stages it uses."""

    name: str
    spec: JobSpec
    needs: list[str] = field(default_factory=list)

    @property
    def job_dir(self) -> JobDir:
        return JobDir(self.spec.output.dir or "")


@dataclass
class Pipeline:
    name: str
    root: Path
    stages: list[Stage]

    def plan_json(self) -> str:
        """The plan, as the pipeline's spec.json (and the service's stored spec)."""
        return json.dumps({PLAN_KEY: self.name, "stages": [
            {"name": stage.name, "needs": stage.needs, "spec": json.loads(spec_to_json(stage.spec))}
            for stage in self.stages]}, indent=2) + "\n"


def is_pipeline_document(data: Any) -> bool:
    """Whether a config or spec document is a pipeline (a ``stages:`` list) rather than one JobSpec."""
    return isinstance(data, dict) and "stages" in data


# ---------------------------------------------------------------------------------------------------
# Planning: a pipeline document (+ overrides) -> validated stages


def _as_method_section(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` laid over ``base``, section by section (a stage's keys win over the defaults)."""
    merged = dict(base)
    for key, value in over.items():
        if key == "method":
            value = _as_method_section(value)
            if isinstance(merged.get(key), str | dict):
                merged[key] = _as_method_section(merged[key])
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _split_overrides(overrides: list[str], stage_names: list[str]) -> tuple[list[str], list[str], dict[str, list[str]]]:
    """(top-level, every-stage, per-stage) overrides: ``stages.<name>.a.b=c`` addresses one stage,
    ``defaults.a.b=c`` or a plain ``a.b=c`` every stage, ``name=``/``output_dir=`` the pipeline."""
    top, every, per_stage = [], [], {name: [] for name in stage_names}
    for text in overrides:
        key = text.partition("=")[0].strip()
        if key in ("name", "output_dir"):
            top.append(text)
        elif key.startswith("defaults."):
            every.append(text[len("defaults."):])
        elif key.startswith("stages."):
            name, _, rest = key[len("stages."):].partition(".")
            if name not in per_stage:
                hint = closest_name(name, stage_names)
                raise ConfigError(f"override {text!r}: no stage named {name!r}"
                                  + (f"; did you mean {hint!r}?" if hint else f" (stages: {', '.join(stage_names)})"))
            if not rest:
                raise ConfigError(f"override {text!r}: say which key of stage {name!r}, e.g. "
                                  f"stages.{name}.training.max_steps=10")
            per_stage[name].append(text[len(f"stages.{name}."):])
        else:
            every.append(text)
    return top, every, per_stage


def _references(value: Any) -> list[str]:
    """Every ``${...}`` expression in the strings of ``value``."""
    found: list[str] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found.extend(REFERENCE.findall(item))
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def _parse_reference(expression: str, where: str, stage_names: list[str]) -> tuple[str, str]:
    parts = expression.split(".")
    if len(parts) != 3 or parts[0] != "stages":
        raise ConfigError(f"{where}: ${{{expression}}} is not a stage reference; write ${{stages.<name>.final}} "
                          "or ${stages.<name>.dir}")
    _, target, kind = parts
    if target not in stage_names:
        hint = closest_name(target, stage_names)
        raise ConfigError(f"{where}: ${{{expression}}} names no stage {target!r}"
                          + (f"; did you mean {hint!r}?" if hint else f" (stages: {', '.join(stage_names)})"))
    if kind not in REFERENCE_KINDS:
        raise ConfigError(f"{where}: ${{{expression}}}: a stage has no {kind!r}; use one of "
                          + ", ".join(f"{k} ({v})" for k, v in REFERENCE_KINDS.items()))
    return target, kind


def _check_order(needs: dict[str, list[str]], order: list[str]) -> None:
    """A stage may only use stages before it; a reference forward is named as such, or as a cycle."""
    position = {name: index for index, name in enumerate(order)}
    for name in order:
        for target in needs[name]:
            if target == name:
                raise ConfigError(f"stages.{name}: refers to its own output (${{stages.{name}...}}); a stage can "
                                  "only use the output of a stage before it")
            if position[target] > position[name]:
                cycle = _find_cycle(needs, target, name)
                what = (f"a cycle ({' -> '.join(cycle)})" if cycle
                        else f"stage {target!r}, which runs after it")
                raise ConfigError(f"stages.{name}: uses the output of {what}; a stage can only use the output of "
                                  "a stage listed before it")


def _find_cycle(needs: dict[str, list[str]], start: str, goal: str) -> list[str] | None:
    """A path of references from ``start`` back to ``goal`` (so goal -> start -> ... -> goal is a cycle)."""
    stack = [(start, [goal, start])]
    seen = set()
    while stack:
        node, path = stack.pop()
        if node == goal:
            return path
        if node in seen:
            continue
        seen.add(node)
        stack.extend((target, [*path, target]) for target in needs.get(node, []))
    return None


def _substitute(value: Any, outputs: dict[tuple[str, str], str]) -> Any:
    if isinstance(value, str):
        return REFERENCE.sub(lambda match: outputs[tuple(match.group(1).split(".")[1:])], value)  # type: ignore[index]
    if isinstance(value, dict):
        return {key: _substitute(item, outputs) for key, item in value.items()}
    if isinstance(value, list):
        return [_substitute(item, outputs) for item in value]
    return value


def plan_pipeline(data: dict[str, Any], overrides: list[str] | None = None, *, root: str | Path | None = None,
                  name: str | None = None) -> Pipeline:
    """Validate a pipeline document and plan its stages. ``root``: the pipeline's directory (default:
    ``output_dir`` from the document, else ``runs/<name>``); ``name``: used when the document has none."""
    if not isinstance(data, dict):
        raise ConfigError(f"a pipeline must be a mapping with a 'stages' list, got {type(data).__name__}")
    check_depth(data, "the pipeline")
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            hint = closest_name(str(key), list(TOP_LEVEL_KEYS))
            raise ConfigError(f"unknown pipeline key {key!r}" + (f"; did you mean {hint!r}?" if hint else
                              f" (valid keys: {', '.join(TOP_LEVEL_KEYS)}; stage settings go under stages:)"))
    raw_stages = data.get("stages")
    if not isinstance(raw_stages, list) or not raw_stages:
        raise ConfigError("stages: a pipeline needs a non-empty list of stages, each {name: ..., <JobSpec sections>}")
    names: list[str] = []
    for index, stage in enumerate(raw_stages):
        if not isinstance(stage, dict):
            raise ConfigError(f"stages[{index}]: a stage is a mapping {{name: ..., <JobSpec sections>}}, "
                              f"got {type(stage).__name__}")
        stage_name = stage.get("name")
        if not isinstance(stage_name, str) or not STAGE_NAME.match(stage_name):
            raise ConfigError(f"stages[{index}].name: each stage needs a name of letters, digits, '-' or '_' "
                              f"(it names the stage's folder), got {stage_name!r}")
        if stage_name in RESERVED_NAMES:
            raise ConfigError(f"stages[{index}].name: {stage_name!r} is a name the pipeline's own folder uses; "
                              "choose another")
        if stage_name in names:
            raise ConfigError(f"stages[{index}].name: two stages are named {stage_name!r}")
        names.append(stage_name)

    top, every, per_stage = _split_overrides(list(overrides or []), names)
    header = apply_overrides({key: data[key] for key in ("name", "output_dir") if key in data}, top)
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"defaults: a mapping of JobSpec sections merged into every stage, got "
                          f"{type(defaults).__name__}")
    if "name" in defaults or (isinstance(defaults.get("output"), dict) and "dir" in defaults["output"]):
        raise ConfigError("defaults: name and output.dir are set per stage by the pipeline; remove them")
    pipeline_name = header.get("name") or name
    if not isinstance(pipeline_name, str) or not pipeline_name:
        raise ConfigError("name: the pipeline needs a name (set name: in the file)")
    # Absolute, as every path the stages' specs record: the plan is read again from anywhere (a resume from
    # another working directory, the service's worker, `posttrain train <stage>/spec.json`).
    root_path = Path(absolute(root if root is not None else header.get("output_dir") or Path("runs") / pipeline_name))

    merged: dict[str, dict[str, Any]] = {}
    needs: dict[str, list[str]] = {}
    finals: list[tuple[str, str]] = []  # (stage, the stage whose final/ it uses)
    for raw in raw_stages:
        stage_name = raw["name"]
        body = {key: value for key, value in raw.items() if key != "name"}
        if isinstance(body.get("output"), dict) and body["output"].get("dir") is not None:
            raise ConfigError(f"stages.{stage_name}.output.dir: the pipeline puts each stage in "
                              f"{root_path}/{stage_name}; remove it (set output_dir: for the pipeline)")
        stage_data = apply_overrides(_merge(defaults, body), [*every, *per_stage[stage_name]])
        needs[stage_name] = []
        for expression in _references(stage_data):
            target, kind = _parse_reference(expression, f"stages.{stage_name}", names)
            if kind == "final":
                finals.append((stage_name, target))
            if target not in needs[stage_name]:
                needs[stage_name].append(target)
        merged[stage_name] = stage_data
    _check_order(needs, names)

    outputs = {}
    for stage_name in names:
        outputs[(stage_name, "dir")] = str(root_path / stage_name)
        outputs[(stage_name, "final")] = str(root_path / stage_name / "final")
    stages = []
    for stage_name in names:
        stage_data = _substitute(merged[stage_name], outputs)
        stage_data.setdefault("name", f"{pipeline_name}-{stage_name}")
        try:
            spec = spec_from_dict(stage_data)
        except ConfigError as exc:
            raise ConfigError(f"stages.{stage_name}: {exc.message}") from None
        if spec.distributed.launcher != "local":
            # Stages run in the pipeline's own process (run_worker): a torchrun or kfp launcher would be
            # ignored and the stage trained on one process without a word.
            raise ConfigError(f"stages.{stage_name}.distributed.launcher: {spec.distributed.launcher} is not "
                              "supported in a pipeline (each stage runs in one local process); remove it or "
                              "run this stage as its own job")
        stages.append(Stage(stage_name, bind_job_dir(spec, root_path / stage_name), needs[stage_name]))
    saves_final = {stage.name: stage.spec.output.save_final for stage in stages}
    for user, target in finals:
        if not saves_final[target]:
            raise ConfigError(f"stages.{user}: uses ${{stages.{target}.final}}, but stage {target!r} does not save "
                              "one (output.save_final: false)")
    return Pipeline(pipeline_name, root_path, stages)


def load_pipeline(path: str | Path, overrides: list[str] | None = None, root: str | Path | None = None) -> Pipeline:
    """Read a pipeline YAML file, apply overrides and plan it (its name defaults to the file's stem)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pipeline file {path} does not exist")
    data = load_yaml(path.read_text(), str(path))
    try:
        return plan_pipeline(data, overrides, root=root, name=path.stem)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.message}") from None


def pipeline_from_plan(data: dict[str, Any], root: str | Path) -> Pipeline:
    """A plan read back from a pipeline's spec.json (each stage's spec validated again)."""
    stages = []
    for entry in data.get("stages") or []:
        try:
            spec = spec_from_dict(entry["spec"])
        except (KeyError, TypeError):
            raise ConfigError(f"{root}/spec.json: not a pipeline plan (a stage lacks its spec)") from None
        stages.append(Stage(str(entry["name"]), spec, list(entry.get("needs") or [])))
    if not stages:
        raise ConfigError(f"{root}/spec.json: the pipeline plan has no stages")
    return Pipeline(str(data[PLAN_KEY]), Path(root), stages)


# ---------------------------------------------------------------------------------------------------
# Running: each stage through run_worker, the pipeline's own directory kept current


@dataclass
class PipelineResult:
    state: str
    root: Path
    stages: dict[str, Any] = field(default_factory=dict)  # stage name -> JobResult (stages run now)
    skipped: list[str] = field(default_factory=list)
    failed_stage: str | None = None
    error: str | None = None
    input_error: bool = False
    cancelled_by: str | None = None

    @property
    def exit_code(self) -> int:
        return exit_code_for(self.state, self.cancelled_by, self.input_error)


def _spec_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys.extend(_spec_differences(a, b, f"{prefix}{key}."))
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def stage_done(stage: Stage) -> bool:
    """Whether the stage already succeeded with this very spec (then a rerun skips it). A stage that
    succeeded with another spec is an error: its output would not be what this pipeline asks for."""
    jd = stage.job_dir
    status = jd.read_status()
    if status is None or status.state != "succeeded":
        return False
    if stage.spec.output.save_final and not jd.final_dir.is_dir():
        return False
    try:
        before = jd.read_spec_dict()
    except (OSError, ValueError):
        return False
    changed = _spec_differences(before, json.loads(spec_to_json(stage.spec)))
    if changed:
        raise ConfigError(f"stages.{stage.name}: already succeeded in {jd.root} with a different spec "
                          f"({', '.join(changed[:5])}); use --overwrite to run the pipeline again from the "
                          "start, or another output_dir")
    return True


class StageMirror:
    """Keeps the pipeline's status.json and metrics.jsonl current while a stage runs (from the stage's own
    files, so it works for every method), once a second and once more when the stage ends."""

    def __init__(self, pipeline: Pipeline, root: JobDir) -> None:
        self.pipeline = pipeline
        self.root = root
        self.current: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._signature: tuple[Any, ...] | None = None
        self._progress: tuple[Any, ...] | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="posttrain-pipeline-mirror", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.sync()

    def _loop(self) -> None:
        while not self._stop.wait(MIRROR_INTERVAL_S):
            try:
                self.sync()
            except Exception:  # progress is best effort; the stage's own files stay the truth
                log.exception("could not update the pipeline's status")

    def stage_summaries(self) -> tuple[list[dict[str, Any]], int, int | None]:
        """Each stage's state and steps, and the pipeline's step and total over all stages (steps count
        on from one stage to the next; the total is known once every stage's is)."""
        summaries, offset, total = [], 0, 0
        current_step = 0
        for stage in self.pipeline.stages:
            status = stage.job_dir.read_status()
            steps = stage.spec.training.max_steps
            stage_total = status.total_steps if status and status.total_steps else (steps if steps > 0 else None)
            summaries.append({"name": stage.name, "method": stage.spec.method.name, "dir": str(stage.job_dir.root),
                              "state": status.state if status else "queued", "step": status.step if status else 0,
                              "total_steps": stage_total, "error": status.error if status else None})
            if status is not None:
                current_step = offset + status.step
            if total is not None:
                total = None if stage_total is None else total + stage_total
            if status is not None and status.state == "succeeded":
                offset += status.step
        return summaries, current_step, total

    def sync(self) -> None:
        with self._lock:
            summaries, step, total = self.stage_summaries()
            progress = (self.current, summaries, step, total)
            if progress != self._progress:  # status.json is rewritten (and synced) only when it changes
                self.root.update_status(stage=self.current, stages=summaries, step=step, total_steps=total)
                self._progress = progress
            self._sync_metrics(summaries)

    def _sync_metrics(self, summaries: list[dict[str, Any]]) -> None:
        """The pipeline's metrics.jsonl: every stage's records in order, tagged with the stage, their steps
        counted on over the stages (stage_step keeps the stage's own). Rebuilt when a stage's file changed
        (a resumed stage rewrites its own)."""
        signature = []
        for stage in self.pipeline.stages:
            try:
                stat = os.stat(stage.job_dir.metrics_path)
                signature.append((stat.st_ino, stat.st_size, stat.st_mtime_ns))
            except OSError:
                signature.append(None)
        if tuple(signature) == self._signature:
            return
        lines, offset = [], 0
        for stage, summary in zip(self.pipeline.stages, summaries, strict=True):
            for record in stage.job_dir.read_metrics():
                stage_step = int(record.get("step", 0) or 0)
                lines.append(json.dumps({**record, "stage": stage.name, "stage_step": stage_step,
                                         "step": offset + stage_step}, default=float) + "\n")
            if summary["state"] != "succeeded":
                break
            offset += summary["step"]
        atomic_write_text(self.root.metrics_path, "".join(lines))
        self._signature = tuple(signature)


class _BetweenStages:
    """Signals that arrive while no stage runs (each stage's worker handles its own): stop before the next."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def install(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handle(signum, _frame):
            name = signal.Signals(signum).name
            if self.signal_name is None or signum != PAUSE_SIGNAL:  # a cancel replaces a pause
                acknowledge_stop("pause" if signum == PAUSE_SIGNAL else "cancel", name)
                self.signal_name = name

        return {signum: signal.signal(signum, handle) for signum in (*CANCEL_SIGNALS, PAUSE_SIGNAL)}

    @property
    def outcome(self) -> str:
        return "paused" if self.signal_name == PAUSE_SIGNAL.name else "cancelled"


def check_fresh_pipeline(pipeline: Pipeline) -> None:
    """Before a run: a succeeded stage with another spec stops it here, before any stage runs."""
    for stage in pipeline.stages:
        stage_done(stage)


def run_pipeline(pipeline: Pipeline, resume: bool = False, log_to_file: bool = True) -> PipelineResult:
    """Run the stages in order through the worker's run_worker; skip those already done. Never raises for
    a stage's failure (the result says which stage and why); raises ConfigError, touching nothing, when a
    finished stage's spec changed or a stage's directory holds an interrupted run and ``resume`` is not set."""
    from posttrain.worker import run_worker
    from posttrain.worker.logs import setup_logging

    check_fresh_pipeline(pipeline)
    if not resume:
        for stage in pipeline.stages:
            if not stage_done(stage) and (stage.job_dir.checkpoints(complete_only=False)
                                          or stage.job_dir.final_dir.exists()):
                raise ConfigError(f"stages.{stage.name}: {stage.job_dir.root} holds an interrupted run; use "
                                  "--resume to continue it, or --overwrite to start the pipeline again")
    root = JobDir(pipeline.root).create()
    setup_logging(root, log_to_file)
    root.write_spec(pipeline.plan_json())
    previous = root.read_status()
    between = _BetweenStages()
    # Before "running" with our pid is recorded: that tells the service it may send a pause, and SIGUSR1's
    # default action would kill this process.
    handlers = between.install()
    root.update_status(state="running", pid=os.getpid(), attempt=(previous.attempt + 1) if previous else 1,
                       error=None, finished_at=None)
    result = PipelineResult(state="running", root=root.root)
    mirror = StageMirror(pipeline, root)
    mirror.start()
    try:
        for stage in pipeline.stages:
            if stage_done(stage):
                result.skipped.append(stage.name)
                log.info("stage %s: already succeeded, skipped", stage.name)
                continue
            if between.signal_name is not None:
                result.state, result.cancelled_by = between.outcome, between.signal_name
                break
            mirror.current = stage.name
            mirror.sync()
            log.info("stage %s (%s) -> %s", stage.name, stage.spec.method.name, stage.job_dir.root)
            # run_worker handles signals during the stage and restores ours after it; every stage keeps
            # its own worker.log, and the pipeline's lines go back to its own log afterwards.
            stage_result = run_worker(stage.spec, stage.job_dir.root, resume=resume, log_to_file=True)
            setup_logging(root, log_to_file)
            result.stages[stage.name] = stage_result
            if stage_result.pause_pending and between.signal_name is None:
                between.signal_name = PAUSE_SIGNAL.name  # paused on the stage's last step: before the next
            if stage_result.state != "succeeded":
                result.state, result.failed_stage = stage_result.state, stage.name
                result.cancelled_by, result.input_error = stage_result.cancelled_by, stage_result.input_error
                if stage_result.error:
                    result.error = f"stage {stage.name}: {stage_result.error}"
                break
        else:
            result.state = "succeeded"
            mirror.current = None
    except PosttrainError as exc:
        result.state, result.error, result.input_error = "failed", exc.message, True
    except BaseException as exc:
        result.state, result.error = "failed", f"{type(exc).__name__}: {exc}"
        raise
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        mirror.stop()
        root.update_status(state=result.state if result.state in TERMINAL_STATES | {"paused"} else "failed",
                           error=result.error, stage=mirror.current)
    return result


def run_plan_file(spec_path: Path, job_dir: Path, resume: bool, log_to_file: bool) -> PipelineResult:
    """Run the plan a job directory's spec.json holds (the service runs a pipeline as one job)."""
    data = json.loads(spec_path.read_text())
    return run_pipeline(pipeline_from_plan(data, job_dir), resume=resume, log_to_file=log_to_file)


def main(argv: list[str] | None = None) -> int:
    """``python -m posttrain.pipeline --spec plan.json --job-dir DIR [--resume] [--no-log-file]``: the worker's
    command line for a plan (the worker hands a plan it is given over to this)."""
    import sys

    from posttrain.job.result import EXIT_BAD_INPUT
    from posttrain.worker.entry import worker_arguments

    args = worker_arguments("python -m posttrain.pipeline", main.__doc__).parse_args(argv)
    acknowledge_stops(JobDir(args.job_dir).create(), os.getpid())  # the service signals this process
    try:
        return run_plan_file(Path(args.spec), Path(args.job_dir), args.resume, not args.no_log_file).exit_code
    except (OSError, ValueError, PosttrainError) as exc:
        message = exc.message if isinstance(exc, PosttrainError) else f"cannot run plan {args.spec}: {exc}"
        print(f"error: {message}", file=sys.stderr)
        JobDir(args.job_dir).create().update_status(state="failed", error=message)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    raise SystemExit(main())
