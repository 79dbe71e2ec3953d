"""Weight-sync latency of every mode on the same model in one run, plus the inference server's tokens/s.

    .venv/bin/python bench/weight_sync.py [--model posttrain:smollm2] [--steps 3]

Modes: shared_vllm (pause + resume around the optimizer step), broadcast (gloo, every tensor), lora_only
(save the adapter + /v1/load_lora_adapter under a new name + unload the previous one), lora_inplace (same,
one name reloaded in place) and none (save a full checkpoint + restart the server until healthy). Each
sync is checked: after the last one the server's greedy output must equal the trainer's. Writes
bench/results/weight_sync.json. The measuring code is posttrain/rl/sync_bench.py (also behind
`posttrain rl bench-sync`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from posttrain.weight_sync.bench import run_benchmark  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="posttrain:smollm2")
    parser.add_argument("--steps", type=int, default=3, help="syncs per mode (the median is reported)")
    parser.add_argument("--generation-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="concurrent requests for the batched tokens/s")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "weight_sync.json")
    args = parser.parse_args()
    report = run_benchmark(args.model, steps=args.steps, generation_tokens=args.generation_tokens, batch=args.batch,
                           progress=lambda mode: print(f"measuring {mode}", flush=True))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    for mode, row in report["modes"].items():
        print(f"{mode:13s} median {row['median_s'] * 1000:9.1f} ms  served = trainer: {row['served_matches_trainer']}")
    print(json.dumps(report["generation"]))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
