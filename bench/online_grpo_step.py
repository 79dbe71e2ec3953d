"""Online GRPO trainer step: full fine-tune vs LoRA vs LoRA with the KL term, on the same batch.

    .venv/bin/python bench/online_grpo_step.py            # posttrain:smollm2 (135M), 8 x 192-token sequences
    .venv/bin/python bench/online_grpo_step.py --quick    # smoke run: posttrain:tiny

Each variant runs :func:`posttrain.rl.grpo.trainer.train_step` (forward, loss, backward, clip, AdamW step) on
one hand-built batch of scored groups with inference log-probs, in this process, on one CPU thread;
the first ``--warmup`` steps are not timed. No trajectory API and no weight sync: this measures the
trainer's own compute. ``lora_kl`` adds the reference forward (the adapter switched off) that
``method.beta > 0`` costs. Writes bench/results/online_grpo_step.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO_ROOT / "bench" / "results" / "online_grpo_step.json"
VARIANTS = {"full": ("none", 0.0), "lora": ("lora", 0.0), "lora_kl": ("lora", 0.05)}


def scored_batch(vocab: int, sequences: int, length: int, prompt: int, seed: int = 0) -> list[dict[str, Any]]:
    """Groups of 4 sequences (prompt + completion), scores 0/1, with inference log-probs near the truth."""
    rng = random.Random(seed)
    groups = []
    for _ in range(sequences // 4):
        head = [rng.randrange(vocab) for _ in range(prompt)]
        tokens = [head + [rng.randrange(vocab) for _ in range(length - prompt)] for _ in range(4)]
        groups.append({"tokens": tokens, "masks": [[-100] * prompt + t[prompt:] for t in tokens],
                       "scores": [float(i % 2) for i in range(4)],
                       "inference_logprobs": [[1.0] * prompt + [-10.0] * (length - prompt) for _ in range(4)]})
    return groups


def run_variant(model_name: str, peft: str, beta: float, steps: int, warmup: int, sequences: int, length: int,
                micro_batch: int) -> dict[str, Any]:
    import torch

    from posttrain.modeling import apply_threads, load_tokenizer, resolve_placement
    from posttrain.rl.grpo.loss import LossConfig
    from posttrain.rl.grpo.rollouts import build_batch
    from posttrain.rl.grpo.trainer import build_optimizer, build_policy, build_reference, train_step
    from posttrain.spec import spec_from_dict

    spec = spec_from_dict({"model": {"name_or_path": model_name},
                           "method": {"name": "online_grpo", "sync_weights": False, "beta": beta},
                           "peft": {"type": peft, "r": 16, "alpha": 32},
                           "training": {"max_steps": steps + warmup, "learning_rate": 1e-5, "num_threads": 1}})
    placement = resolve_placement(spec.model)
    apply_threads(1, placement.device)
    torch.manual_seed(0)
    tokenizer = load_tokenizer(spec)
    model = build_policy(spec, placement, None)
    reference = build_reference(spec, placement, model)
    optimizer, _ = build_optimizer(spec, model)
    batch = build_batch(scored_batch(len(tokenizer), sequences, length, prompt=length // 4), tokenizer.pad_token_id)
    config = LossConfig(beta=beta)
    times = []
    for index in range(warmup + steps):
        result = train_step(model, reference, batch, micro_batch, config, optimizer, 1.0, None)
        if index >= warmup:
            times.append(result.seconds)
    tokens = int(batch.attention_mask.sum())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"seconds_per_step": sum(times) / len(times), "tokens_per_second": tokens * len(times) / sum(times),
            "tokens_per_step": tokens, "trainable_parameters": trainable, "final_loss": result.loss,
            "mean_ratio": result.stats.means()["mean_ratio"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="posttrain:tiny, 1 timed step")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    model = "posttrain:tiny" if args.quick else "posttrain:smollm2"
    steps, warmup = (1, 1) if args.quick else (3, 1)
    sequences, length, micro_batch = (8, 32, 4) if args.quick else (8, 192, 4)
    results = {name: run_variant(model, peft, beta, steps, warmup, sequences, length, micro_batch)
               for name, (peft, beta) in VARIANTS.items()}
    report = {
        "benchmark": "online_grpo_step", "model": model, "sequences": sequences, "sequence_length": length,
        "micro_batch": micro_batch, "timed_steps": steps, "results": results,
        "ratios": {"lora_over_full_tokens_per_s": results["lora"]["tokens_per_second"]
                   / results["full"]["tokens_per_second"],
                   "kl_cost_lora_kl_over_lora_seconds": results["lora_kl"]["seconds_per_step"]
                   / results["lora"]["seconds_per_step"]},
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpu_count": __import__("os").cpu_count()},
        "time": time.time(),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    json.dump(report["results"], sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
