"""PPO throughput: rollout (generation) and update tokens/s, LoRA against full fine-tuning, in one run.

    .venv/bin/python bench/ppo.py                       # posttrain:tiny, 8 steps per variant
    .venv/bin/python bench/ppo.py --model posttrain:smollm2 --steps 4 --batch 8 --response-length 32
    .venv/bin/python bench/ppo.py --quick               # smoke run (tests)

Each variant is one `method: ppo` job (the one worker entrypoint, `posttrain.worker.run_worker`) in a fresh
subprocess: same model, prompts (the bundled preference sample's), reward model (the base model with a
randomly initialised score head: throughput does not depend on what the scores mean), batch, answer length,
ppo_epochs, mini-batches and seed; only peft.type differs. Numbers come from the job's own metrics.jsonl,
summed over the timed steps (the first ``--warmup`` steps are excluded):

- ``rollout_tokens_per_s``: generated answer tokens / seconds inside batched generation;
- ``update_tokens_per_s``: sequence tokens (prompt + answer) forwarded by the scoring pass and the
  ppo_epochs x (actor + critic) update passes / seconds of scoring + update;
- ``step_seconds``: mean wall time of a whole PPO step (generation + scoring + update).

Results go to bench/results/ppo.json.
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

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO_ROOT / "bench" / "results" / "ppo.json"
VARIANTS = {"lora": {"type": "lora", "r": 16, "alpha": 32}, "full": {"type": "none"}}


def variant_spec(args: argparse.Namespace, peft: dict) -> dict:
    return {
        "model": {"name_or_path": args.model, "dtype": "fp32"},
        "method": {"name": "ppo", "reward_model": args.model, "ppo_epochs": args.ppo_epochs, "num_mini_batches": 2,
                   "response_length": args.response_length, "temperature": 1.0},
        "peft": peft,
        "data": {"source": "posttrain:preference"},
        "training": {"max_steps": args.steps, "per_device_train_batch_size": args.batch // 2,
                     "learning_rate": 1e-5 if peft["type"] == "none" else 1e-4, "logging_steps": 1,
                     "save_steps": None, "num_threads": args.threads, "seed": 42},
        "output": {"save_final": False},
        "tracking": {"report_to": []},
    }


def run_variant(name: str, spec: dict, workdir: Path) -> dict:
    """Run one variant's job in a fresh Python and read its metrics."""
    spec_path = workdir / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    job_dir = workdir / name
    started = time.perf_counter()
    completed = subprocess.run([sys.executable, "-m", "posttrain.worker", "--spec", str(spec_path), "--job-dir",
                                str(job_dir), "--no-log-file"], capture_output=True, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": str(spec["training"]["num_threads"])})
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        raise SystemExit(f"variant {name} failed:\n{completed.stderr[-4000:]}")
    return {"metrics": [json.loads(line) for line in (job_dir / "metrics.jsonl").read_text().splitlines()],
            "process_seconds": seconds}


def summarise(metrics: list[dict], warmup: int) -> dict:
    timed = metrics[warmup:] or metrics
    generated = sum(m["generated_tokens"] for m in timed)
    generation_s = sum(m["generation_seconds"] for m in timed)
    update_tokens = sum(m["update_tokens"] for m in timed)
    update_s = sum(m["update_seconds"] for m in timed)
    return {
        "timed_steps": len(timed),
        "rollout_tokens_per_s": generated / generation_s,
        "update_tokens_per_s": update_tokens / update_s,
        "step_seconds": (generation_s + update_s) / len(timed),
        "generated_tokens": generated, "generation_seconds": generation_s,
        "update_tokens": update_tokens, "update_seconds": update_s,
        "mean_response_length": sum(m["response_length"] for m in timed) / len(timed),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="posttrain:tiny")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="rollouts per PPO step (two mini-batches)")
    parser.add_argument("--response-length", type=int, default=32)
    parser.add_argument("--ppo-epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="2 steps, 4 rollouts, 8 tokens (a smoke run)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.batch, args.response_length = 2, 1, 4, 8
    results = {}
    with tempfile.TemporaryDirectory(prefix="ppo-bench-") as tmp:
        for name, peft in VARIANTS.items():
            run = run_variant(name, variant_spec(args, peft), Path(tmp))
            results[name] = {**summarise(run["metrics"], args.warmup), "process_seconds": run["process_seconds"]}
            print(f"{name}: rollout {results[name]['rollout_tokens_per_s']:.0f} tok/s, update "
                  f"{results[name]['update_tokens_per_s']:.0f} tok/s, {results[name]['step_seconds']:.2f} s/step")
    import torch
    import transformers

    report = {
        "settings": {key: value for key, value in vars(args).items() if key != "output"},
        "variants": results,
        "ratios": {"lora_over_full_rollout": results["lora"]["rollout_tokens_per_s"]
                   / results["full"]["rollout_tokens_per_s"],
                   "lora_over_full_update": results["lora"]["update_tokens_per_s"]
                   / results["full"]["update_tokens_per_s"]},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_average": os.getloadavg()[0], "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
