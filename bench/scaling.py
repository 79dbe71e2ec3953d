"""Scaling: the same SFT work on 1 and 2 torchrun processes, DDP and FSDP2, side by side in one run.

    .venv/bin/python bench/scaling.py            # ~3 min on 2 CPU cores
    .venv/bin/python bench/scaling.py --quick    # smoke run: a few steps

Every variant is ``posttrain train`` with ``distributed.launcher=torchrun`` on posttrain:tiny (full fine-tune,
alpaca rows in dataset order), with the same global batch (``--global-batch`` rows per step, split over the
ranks), steps, learning rate and seed, and one OpenMP thread per rank (the launcher's default; reported).
Throughput counts the tokens every rank trained on (the Trainer's global count) over the wall time between
the first logged step after ``--warmup`` and the last, so start-up, loading and the first steps are excluded.
Memory per rank: ``parameter_bytes_per_rank`` (what the worker measured on its own parameters: shards under
FSDP, the whole model under DDP) and the peak RSS of each rank process (sampled every 0.1 s).
Writes ``bench/results/scaling.json``; bench/README.md reads it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO_ROOT / "bench" / "results" / "scaling.json"
VARIANTS = (("ddp", 1), ("ddp", 2), ("fsdp", 1), ("fsdp", 2))


def job_config(steps: int, global_batch: int, processes: int) -> dict[str, Any]:
    return {
        "model": {"name_or_path": "posttrain:tiny"},
        "peft": {"type": "none"},
        "data": {"source": "posttrain:alpaca"},
        "training": {"max_steps": steps, "per_device_train_batch_size": global_batch // processes,
                     "group_by_length": False, "logging_steps": 1, "save_steps": steps * 10,
                     "learning_rate": 1e-3, "seed": 42},
        "output": {"save_final": False},
        "tracking": {"report_to": []},
    }


def run_variant(strategy: str, processes: int, steps: int, warmup: int, global_batch: int,
                workdir: Path) -> dict[str, Any]:
    config = workdir / f"{strategy}-{processes}.yaml"
    config.write_text(yaml.safe_dump(job_config(steps, global_batch, processes)))
    job_dir = workdir / f"{strategy}-{processes}"
    argv = [sys.executable, "-m", "posttrain.cli", "train", str(config), "-o", str(job_dir),
            "distributed.launcher=torchrun", f"distributed.nproc_per_node={processes}",
            f"distributed.strategy={strategy}"]
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}  # the launcher sets it
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peak_rss: dict[int, int] = {}
    root = psutil.Process(process.pid)
    while process.poll() is None:
        try:
            for child in root.children(recursive=True):
                if "posttrain.worker" in child.cmdline() and "torch.distributed.run" not in child.cmdline():
                    peak_rss[child.pid] = max(peak_rss.get(child.pid, 0), child.memory_info().rss)
        except psutil.Error:
            pass
        time.sleep(0.1)
    output = process.stdout.read() if process.stdout else ""
    if process.returncode != 0:
        raise RuntimeError(f"{strategy} x{processes} failed:\n{output[-3000:]}")
    records = [json.loads(line) for line in (job_dir / "metrics.jsonl").read_text().splitlines()]
    steps_logged = [record for record in records if "loss" in record]
    first = next(record for record in steps_logged if record["step"] >= warmup)
    last = steps_logged[-1]
    elapsed = last["time"] - first["time"]
    return {
        "strategy": strategy,
        "processes": processes,
        "tokens_per_s": round((last["num_tokens_seen"] - first["num_tokens_seen"]) / elapsed, 1),
        "timed_steps": last["step"] - first["step"],
        "final_loss": last["loss"],
        "parameter_bytes_per_rank": last["parameter_bytes_per_rank"],
        "peak_rss_mb_per_rank": sorted(round(rss / 2**20, 1) for rss in peak_rss.values()),
        "num_threads_per_rank": last["num_threads"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: a few steps per variant")
    parser.add_argument("--steps", type=int, help="optimizer steps per variant (default 40; quick 4)")
    parser.add_argument("--warmup", type=int, help="steps excluded from timing (default 5; quick 1)")
    parser.add_argument("--global-batch", type=int, default=8, help="rows per step over all ranks (even)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="results JSON")
    args = parser.parse_args(argv)
    steps = args.steps or (4 if args.quick else 40)
    warmup = args.warmup or (1 if args.quick else 5)
    results = []
    with tempfile.TemporaryDirectory(prefix="posttrain-scaling-") as workdir:
        for strategy, processes in VARIANTS:
            row = run_variant(strategy, processes, steps, warmup, args.global_batch, Path(workdir))
            print(json.dumps(row), flush=True)
            results.append(row)
    by_key = {(row["strategy"], row["processes"]): row for row in results}
    report = {
        "settings": {"model": "posttrain:tiny", "steps": steps, "warmup": warmup, "global_batch": args.global_batch,
                     "method": "sft full fine-tune"},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "load_average": os.getloadavg()},
        "results": results,
        "ratios": {
            "ddp_2_over_1_tokens_per_s": round(by_key[("ddp", 2)]["tokens_per_s"] / by_key[("ddp", 1)]["tokens_per_s"], 3),
            "fsdp_2_over_1_tokens_per_s": round(by_key[("fsdp", 2)]["tokens_per_s"] / by_key[("fsdp", 1)]["tokens_per_s"], 3),
            "fsdp_over_ddp_parameter_bytes_per_rank_at_2": round(
                by_key[("fsdp", 2)]["parameter_bytes_per_rank"] / by_key[("ddp", 2)]["parameter_bytes_per_rank"], 3),
        },
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
