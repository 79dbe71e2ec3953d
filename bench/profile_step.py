"""Where the time of one posttrain SFT step on SmolLM2-135M goes: matmul, attention, elementwise, optimizer, loss.

    .venv/bin/python bench/profile_step.py [--method lora|full] [--compile auto|true|false] [--tokens 280]

Builds the step posttrain runs (bf16 autocast where the CPU has native bf16, eager attention, the
trained-positions loss, AdamW, its decoder layers compiled or not) on a batch of 8 rows, runs two untimed
steps, then profiles one with torch.profiler and sums the self CPU time of its operators into groups. CPU
time, not wall time: other processes on a shared machine move wall time far more. Data loading is not in it
(posttrain's batches are collated in the training process between steps; the real-model suite measures it
as part of the step's wall time).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

GROUPS = (
    ("optimizer", ("Optimizer", "adam", "_foreach")),
    ("attention matmul", ("aten::bmm",)),
    ("matmul", ("aten::mm", "aten::addmm", "aten::linear", "mkldnn", "onednn")),
    ("loss (LM head)", ("FusedLinearCrossEntropy", "aten::softmax", "aten::_softmax", "aten::max", "aten::gather")),
)


def group_of(name: str) -> str:
    lowered = name.lower()
    for group, needles in GROUPS:
        if any(needle.lower() in lowered for needle in needles):
            return group
    return "elementwise and other"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=("lora", "full"), default="lora")
    parser.add_argument("--compile", choices=("true", "false"), default="true")
    parser.add_argument("--tokens", type=int, default=280, help="tokens per row (8 rows)")
    args = parser.parse_args(argv)

    import torch
    from peft import LoraConfig, get_peft_model
    from torch.profiler import profile
    from transformers import AutoModelForCausalLM

    from posttrain.embedded import smollm2_model_path
    from posttrain.losses import trained_token_loss
    from posttrain.recipes.common import compile_decoder_layers

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(smollm2_model_path(), dtype=torch.float32, attn_implementation="eager")
    model.config.use_cache = False
    if args.method == "lora":
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    model.train()
    if args.compile == "true":
        compile_decoder_layers(model)
    base = model.get_base_model() if args.method == "lora" else model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(0, 49000, (8, args.tokens))
    labels = ids.clone()
    labels[:, : args.tokens // 2] = -100  # about half the tokens are trained, as in the real-model suite

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model(input_ids=ids, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
            loss, _, count = trained_token_loss(hidden, base.get_output_embeddings().weight, labels)
        (loss / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    step()
    with profile() as prof:
        step()
    totals: dict[str, float] = {}
    other: dict[str, float] = {}
    for event in prof.key_averages():
        group = group_of(event.key)
        totals[group] = totals.get(group, 0.0) + event.self_cpu_time_total / 1e6
        if group == "elementwise and other":
            other[event.key] = event.self_cpu_time_total / 1e6
    whole = sum(totals.values())
    result = {"method": args.method, "compiled": args.compile == "true", "tokens": 8 * args.tokens,
              "step_cpu_seconds": round(whole, 2),
              "groups": {name: {"seconds": round(value, 2), "share": round(value / whole, 3)}
                         for name, value in sorted(totals.items(), key=lambda item: -item[1])},
              "largest_elementwise_and_other": {name: round(value, 3) for name, value in
                                                sorted(other.items(), key=lambda item: -item[1])[:8]}}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
