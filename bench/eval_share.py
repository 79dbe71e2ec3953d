"""What evaluating every few steps costs a training job, and what batched generation saves.

1. One SFT job with ``eval:`` every ``--every`` steps (teacher-forced loss on the held-out replies, and a
   generation-based grader on greedy answers): the share of the job's wall time its evaluations took (their
   ``seconds``, from the eval records of metrics.jsonl) and the same job without evaluation, for the
   difference in wall time.
   A one-step job runs first, untimed, so that neither timed job pays for the first imports and loads.
2. The generation part alone, on the trained model: the held-out prompts answered through
   ``generate_batch`` in batches of ``--batch-size`` against one prompt at a time (batch 1), same answers.

    .venv/bin/python bench/eval_share.py [--model posttrain:smollm2] [--steps 40] [--every 10] [--quick]

Writes bench/results/eval_share.json (or --output).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from posttrain.job.directory import JobDir  # noqa: E402
from posttrain.spec import spec_from_dict  # noqa: E402
from posttrain.worker import run_worker  # noqa: E402


def job_spec(model: str, steps: int, every: int | None, samples: int, new_tokens: int, batch: int) -> dict:
    spec: dict = {
        "model": {"name_or_path": model},
        "data": {"source": "posttrain:alpaca"},
        "training": {"max_steps": steps, "per_device_train_batch_size": 8, "logging_steps": 1,
                     "save_steps": steps, "learning_rate": 5e-4, "max_seq_length": 256},
        "tracking": {"report_to": []},
    }
    if every is not None:
        spec["eval"] = {"data": "posttrain:style", "every_steps": every, "max_samples": samples,
                        "graders": ["text_similarity"], "max_new_tokens": new_tokens, "batch_size": batch}
    return spec


def run_job(spec: dict, job_dir: Path) -> dict:
    started = time.perf_counter()
    result = run_worker(spec_from_dict(spec), job_dir, log_to_file=True)
    wall = time.perf_counter() - started
    if result.state != "succeeded":
        raise SystemExit(f"benchmark job failed: {result.error}")
    evals = [r for r in JobDir(job_dir).read_metrics() if r.get("kind") == "eval"]
    return {"wall_seconds": round(wall, 2), "evaluations": len(evals),
            "eval_seconds": round(sum(r["seconds"] for r in evals), 2),
            "final_eval": {k: v for k, v in evals[-1].items() if k.startswith("eval_")} if evals else None}


def generation_timing(job_dir: Path, samples: int, new_tokens: int, batch: int) -> dict:
    """The held-out prompts answered by the trained model: in batches of ``batch``, and one at a time."""
    from posttrain.data.eval_rows import load_eval_rows, sample_rows
    from posttrain.eval.answers import LiveModel
    from posttrain.eval.compare import load_target, resolve_target
    from posttrain.modeling import ensure_chat_template

    model, tokenizer = load_target(resolve_target(str(job_dir)))
    ensure_chat_template(tokenizer)
    prompts = [row.prompt for row in sample_rows(load_eval_rows("posttrain:style", "train").rows, samples, 42)]
    timings, answers = {}, {}
    for size in (batch, 1):
        live = LiveModel(model, tokenizer, size)
        started = time.perf_counter()
        answers[size] = live.answer(prompts, new_tokens, 0.0)
        timings[size] = time.perf_counter() - started
    return {"prompts": len(prompts), "batch_size": batch, "batched_seconds": round(timings[batch], 2),
            "one_at_a_time_seconds": round(timings[1], 2), "speedup": round(timings[1] / timings[batch], 2),
            "same_answers": answers[batch] == answers[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="posttrain:tiny")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--samples", type=int, default=32, help="held-out rows per evaluation")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="a few steps and rows: a smoke test")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "eval_share.json")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.every, args.samples, args.new_tokens = 4, 2, 4, 8
    settings = {"model": args.model, "steps": args.steps, "every_steps": args.every, "samples": args.samples,
                "max_new_tokens": args.new_tokens, "batch_size": args.batch_size}
    with tempfile.TemporaryDirectory(prefix="eval-share-") as work:
        work_dir = Path(work)
        args_for = (args.model, args.steps)
        run_job(job_spec(args.model, 1, None, args.samples, args.new_tokens, args.batch_size), work_dir / "warm-up")
        plain = run_job(job_spec(*args_for, None, args.samples, args.new_tokens, args.batch_size), work_dir / "plain")
        evaluated = run_job(job_spec(*args_for, args.every, args.samples, args.new_tokens, args.batch_size),
                            work_dir / "eval")
        generation = generation_timing(work_dir / "eval", args.samples, args.new_tokens, args.batch_size)
    report = {
        "settings": settings,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "load_average": list(os.getloadavg())},
        "without_eval": plain,
        "with_eval": evaluated,
        "eval_share_of_wall_time": round(evaluated["eval_seconds"] / evaluated["wall_seconds"], 4),
        "wall_time_added": round(evaluated["wall_seconds"] - plain["wall_seconds"], 2),
        "generation": generation,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({key: report[key] for key in ("eval_share_of_wall_time", "wall_time_added")}
                     | {"evaluations": evaluated["evaluations"], "generation_speedup": generation["speedup"]}))


if __name__ == "__main__":
    main()
