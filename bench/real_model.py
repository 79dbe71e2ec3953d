"""The real-model suite of bench/sft_throughput.py: SmolLM2-135M-Instruct (``posttrain:smollm2``).

SFT, LoRA (r16, all-linear) and full fine-tune, three variants each on the same chat rows in the same
order: stock TRL (its defaults), TRL tuned by hand (every setting a TRL user can set in its config) and
posttrain (its defaults). Each runs in a fresh subprocess; the same ``StepClock`` callback times every
variant (wall time and real tokens between the end of the warm-up steps and the last step). Each is scored
on the same held-out rows (loss over the reply tokens, fp32). MFU is model FLOPs per real token times real
tokens/s over the matmul peak of this core at the same dtype and thread count, measured in the same run
(the higher of the suite's first measurement and the one in the variant's own process just before it trains).
DPO (pairs/s) and GRPO (generated tokens/s, update tokens/s) are compared with TRL's defaults too.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REAL_METHODS = ("lora", "full")
REAL_VARIANTS = ("stock_trl", "tuned_trl", "posttrain")
SEED = 42


@dataclass
class RealSettings:
    """What every real-model variant shares; written into the results."""

    batch_size: int = 8
    steps: int = 8
    warmup: int = 2
    train_rows: int = 240
    eval_rows: int = 24
    max_seq_length: int = 512
    lora_r: int = 16
    lora_alpha: int = 32
    lora_learning_rate: float = 2e-4
    full_learning_rate: float = 2e-5
    # Chat rows are built from the bundled alpaca sample's sentences: a prompt of an instruction plus up to
    # ``max_context_sentences`` of context, a reply of 1..``max_reply_sentences`` sentences.
    max_context_sentences: int = 24
    max_reply_sentences: int = 40
    # DPO / GRPO lines
    dpo_steps: int = 6
    dpo_batch_size: int = 4
    grpo_steps: int = 3
    grpo_batch_size: int = 8
    grpo_num_generations: int = 4
    grpo_max_completion_length: int = 48

    @classmethod
    def quick(cls) -> RealSettings:
        return cls(batch_size=2, steps=2, warmup=1, train_rows=8, eval_rows=2, max_seq_length=96,
                   max_context_sentences=1, max_reply_sentences=2, dpo_steps=2, dpo_batch_size=2, grpo_steps=2,
                   grpo_batch_size=4, grpo_num_generations=2, grpo_max_completion_length=8)


# ---------------------------------------------------------------------------------------------------------
# Data


def _sentences() -> tuple[list[str], list[str]]:
    from posttrain.tiny import sample_path

    instructions, sentences = [], []
    for line in sample_path("alpaca").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        instructions.append(row["instruction"])
        sentences.extend(part for part in (row.get("input", ""), row["output"]) if part.strip())
    return instructions, sentences


def make_chat_rows(count: int, seed: int, settings: RealSettings) -> list[dict[str, str]]:
    """Alpaca-format rows (instruction / input / output) of realistic chat lengths, deterministic per seed."""
    instructions, sentences = _sentences()
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        context = rng.sample(sentences, rng.randint(0, settings.max_context_sentences))
        reply = rng.sample(sentences, rng.randint(1, settings.max_reply_sentences))
        rows.append({"instruction": rng.choice(instructions), "input": " ".join(context), "output": " ".join(reply)})
    return rows


def prepare_real(work: Path, settings: RealSettings) -> dict[str, str]:
    from posttrain.embedded import smollm2_model_path
    from posttrain.tiny import sample_path

    paths = {"model": str(smollm2_model_path()), "train": str(work / "chat-train.jsonl"),
             "eval": str(work / "chat-eval.jsonl"), "preference": str(sample_path("preference")),
             "gsm8k": str(sample_path("gsm8k"))}
    for name, count, seed in (("train", settings.train_rows, SEED), ("eval", settings.eval_rows, SEED + 1)):
        rows = make_chat_rows(count, seed, settings)
        Path(paths[name]).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return paths


def chat_rows(path: str) -> list[dict[str, Any]]:
    """The conversational prompt/completion rows posttrain makes from the alpaca rows; TRL gets the same."""
    from posttrain.data.formats import alpaca_row

    return [alpaca_row(json.loads(line), "sft") for line in Path(path).read_text(encoding="utf-8").splitlines()
            if line.strip()]


def row_stats(tokenizer, path: str, max_length: int) -> dict[str, float]:
    """Mean tokens per row, the fraction of them that are trained (reply), and the mean causal context."""
    total = trained = context = 0
    for row in chat_rows(path):
        ids, start = _reply_tokens(tokenizer, row)
        ids = ids[:max_length]
        total += len(ids)
        trained += max(0, len(ids) - start)
        context += len(ids) * (len(ids) + 1) / 2
    return {"mean_tokens": total / max(1, len(chat_rows(path))), "trained_fraction": trained / total,
            "mean_context": context / total}


def _reply_tokens(tokenizer, row: dict[str, Any]) -> tuple[list[int], int]:
    prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]
    full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True,
                                         return_dict=True)["input_ids"]
    return list(full), len(prompt)


def reply_eval_loss(model, tokenizer, path: str) -> float:
    """Mean next-token loss over the reply tokens of the held-out rows, fp32, one row at a time."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in chat_rows(path):
            ids, start = _reply_tokens(tokenizer, row)
            tensor = torch.tensor([ids])
            logits = model(input_ids=tensor).logits.float()[0]
            targets = tensor[0, 1:].clone()
            targets[: start - 1] = -100
            total += torch.nn.functional.cross_entropy(logits[:-1], targets, ignore_index=-100,
                                                       reduction="sum").item()
            count += int((targets != -100).sum())
    return total / count


# ---------------------------------------------------------------------------------------------------------
# FLOPs and the matmul peak


def model_flops_per_token(config, method: str, stats: dict[str, float], lora_params: int) -> float:
    """Model FLOPs per real token for one training step (forward + backward), recomputation excluded.

    Linear layers: 2 FLOPs per weight forward; backward 2 more for the input gradient and, when the weight
    trains, 2 more for its gradient. The LM head counts only for trained positions (the loss needs no
    others). Attention scores: 4 x layers x (heads x head_dim) x the mean causal context, x3 with backward.
    """
    text = config.get_text_config()
    hidden, layers = text.hidden_size, text.num_hidden_layers
    head_dim = getattr(text, "head_dim", None) or hidden // text.num_attention_heads
    q_dim, kv_dim = text.num_attention_heads * head_dim, text.num_key_value_heads * head_dim
    per_layer = hidden * (q_dim + 2 * kv_dim) + q_dim * hidden + 3 * hidden * text.intermediate_size
    body, head = layers * per_layer, hidden * text.vocab_size
    full = method == "full"
    linear = (6 if full else 4) * body + (6 if full else 4) * head * stats["trained_fraction"] + 6 * lora_params
    attention = 3 * 4 * layers * q_dim * stats["mean_context"]
    return float(linear + attention)


def matmul_peak_gflops(threads: int = 1, size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Best-of-``repeats`` GFLOPS of one ``size``-cubed matmul, fp32 and bf16, on ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b
        best = min(_timed(lambda a=a, b=b: a @ b) for _ in range(repeats))
        out[name] = round(2 * size**3 / best / 1e9, 1)
    return out


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------------
# Variants (each runs in its own subprocess)


def lora_config(settings: RealSettings):
    from peft import LoraConfig

    return LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=0.0,
                      target_modules="all-linear", task_type="CAUSAL_LM")


def run_real_trl(method: str, variant: str, paths: dict[str, str], settings: RealSettings, out_dir: Path,
                 clock) -> dict[str, Any]:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from bench.sft_throughput import cpu_has_native_bf16, final_loss, peak_rss_mb
    from posttrain.modeling import load_for_inference

    tuned = variant == "tuned_trl"
    torch.set_num_threads(1)  # both: the same thread count as posttrain's default, so only settings differ
    tokenizer = AutoTokenizer.from_pretrained(paths["model"])
    attention = {"attn_implementation": "eager"} if tuned else {}
    model = AutoModelForCausalLM.from_pretrained(paths["model"], dtype=torch.float32, **attention)
    lr = settings.lora_learning_rate if method == "lora" else settings.full_learning_rate
    kwargs: dict[str, Any] = {
        "output_dir": str(out_dir), "max_steps": settings.steps, "per_device_train_batch_size": settings.batch_size,
        "learning_rate": lr, "seed": SEED, "data_seed": SEED, "logging_steps": 1, "save_strategy": "no",
        "report_to": [], "disable_tqdm": True, "include_num_input_tokens_seen": "non_padding", "use_cpu": True,
        "max_length": settings.max_seq_length,
    }
    if tuned:
        # Everything a TRL user can set: bf16 autocast only where the CPU has native bf16, no recomputation,
        # rows of similar length batched together, eager attention (faster than SDPA here at these lengths).
        kwargs.update(bf16=cpu_has_native_bf16(), activation_checkpointing=False,
                      train_sampling_strategy="group_by_length")
    config = SFTConfig(**kwargs)
    trainer = SFTTrainer(model=model, args=config, processing_class=tokenizer,
                         train_dataset=datasets.Dataset.from_list(chat_rows(paths["train"])),
                         peft_config=lora_config(settings) if method == "lora" else None,
                         callbacks=[clock.callback()])
    trainer.train()
    training_rss = round(peak_rss_mb(), 1)
    # Scored like posttrain's run: saved, then loaded fresh in fp32. The in-memory model would not do: with
    # bf16 mixed precision, accelerate wraps its forward in autocast, so it would be scored in bf16.
    trainer.save_model(str(out_dir / "final"))
    tokenizer.save_pretrained(str(out_dir / "final"))
    model, tokenizer = load_for_inference(out_dir / "final")
    return {
        **clock.result(),
        "final_loss": final_loss(clock.losses),
        "eval_loss": round(reply_eval_loss(model, tokenizer, paths["eval"]), 4),
        "peak_rss_mb": training_rss,
        "num_threads": torch.get_num_threads(),
        "dtype": "fp32+bf16-autocast" if config.bf16 else "fp32",
        "gradient_checkpointing": bool(config.activation_checkpointing),
        "sampling": config.train_sampling_strategy,
        "attn_implementation": trainer.model.config._attn_implementation,
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "eval": "saved, reloaded in fp32",
    }


def run_real_posttrain(method: str, paths: dict[str, str], settings: RealSettings, out_dir: Path,
                       clock) -> dict[str, Any]:
    from bench.sft_throughput import final_loss, peak_rss_mb
    from posttrain.modeling import load_for_inference
    from posttrain.spec import spec_from_dict
    from posttrain.worker import run_worker

    lr = settings.lora_learning_rate if method == "lora" else settings.full_learning_rate
    peft = ({"type": "lora", "r": settings.lora_r, "alpha": settings.lora_alpha, "target_modules": "all-linear"}
            if method == "lora" else {"type": "none"})
    spec = spec_from_dict({
        "name": f"bench-{method}",
        "model": {"name_or_path": paths["model"]},
        "data": {"source": paths["train"], "format": "alpaca"},
        "peft": peft,
        "training": {"max_steps": settings.steps, "per_device_train_batch_size": settings.batch_size,
                     "learning_rate": lr, "seed": SEED, "max_seq_length": settings.max_seq_length,
                     "logging_steps": 1},
        "tracking": {"report_to": []},
    })
    result = run_worker(spec, out_dir, log_to_file=False, extra_callbacks=[clock.callback()])
    if result.state != "succeeded":
        raise RuntimeError(f"posttrain run {result.state}: {result.error}")
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    last = [rec for rec in records if "loss" in rec][-1]
    training_rss = round(peak_rss_mb(), 1)  # before the eval copy of the model is loaded
    model, tokenizer = load_for_inference(result.final_dir)
    return {
        **clock.result(),
        "final_loss": final_loss(clock.losses),
        "eval_loss": round(reply_eval_loss(model, tokenizer, paths["eval"]), 4),
        "peak_rss_mb": training_rss,
        "num_threads": last.get("num_threads"),
        "dtype": "fp32+bf16-autocast" if last.get("autocast") == "bf16"
        else {"float32": "fp32", "bfloat16": "bf16"}.get(last.get("dtype"), last.get("dtype")),
        "gradient_checkpointing": last.get("gradient_checkpointing"),
        "sampling": "group_by_length" if last.get("group_by_length") else "random",
        "attn_implementation": last.get("attn_implementation"),
    }


def run_method_line(method: str, variant: str, paths: dict[str, str], settings: RealSettings,
                    out_dir: Path) -> dict[str, Any]:
    """DPO pairs/s or GRPO generated and update tokens/s, LoRA on the real model: TRL defaults vs posttrain."""
    import torch
    from trl import GRPOTrainer

    from bench.sft_throughput import peak_rss_mb

    torch.set_num_threads(1)
    generation = {"seconds": 0.0, "tokens": 0}
    original = GRPOTrainer._generate

    def timed_generate(self, prompts):
        start = time.perf_counter()
        out = original(self, prompts)
        generation["seconds"] += time.perf_counter() - start
        generation["tokens"] += sum(len(ids) for ids in out[1])
        return out

    GRPOTrainer._generate = timed_generate  # the same wrapper for both variants: measurement only
    steps = settings.dpo_steps if method == "dpo" else settings.grpo_steps
    batch = settings.dpo_batch_size if method == "dpo" else settings.grpo_batch_size
    starts: list[float] = []
    marks: dict[str, Any] = {}

    from transformers import TrainerCallback

    class Marks(TrainerCallback):
        def on_step_begin(self, args, state, control, **_):
            if state.global_step == 1:  # the first step is warm-up
                marks["start"] = time.perf_counter()
                marks["generation"] = dict(generation)

        def on_step_end(self, args, state, control, **_):
            starts.append(time.perf_counter())

    if variant == "stock_trl":
        trainer = _stock_trainer(method, paths, settings, out_dir, Marks())
        trainer.train()
        dtype = "fp32+bf16-autocast" if trainer.args.bf16 else "fp32"
        checkpointing = bool(trainer.args.activation_checkpointing)
    else:
        from posttrain.spec import spec_from_dict
        from posttrain.worker import run_worker

        method_spec = ({"name": "dpo", "beta": 0.1} if method == "dpo" else
                       {"name": "grpo", "num_generations": settings.grpo_num_generations,
                        "max_completion_length": settings.grpo_max_completion_length,
                        "reward_functions": ["numeric_match", "answer_format"]})
        spec = spec_from_dict({
            "name": f"bench-{method}", "model": {"name_or_path": paths["model"]}, "method": method_spec,
            "data": {"source": paths["preference" if method == "dpo" else "gsm8k"]},
            "peft": {"type": "lora", "r": settings.lora_r, "alpha": settings.lora_alpha},
            "training": {"max_steps": steps, "per_device_train_batch_size": batch, "seed": SEED,
                         "logging_steps": 1, "learning_rate": 1e-5},
            "tracking": {"report_to": []},
        })
        result = run_worker(spec, out_dir, log_to_file=False, extra_callbacks=[Marks()])
        if result.state != "succeeded":
            raise RuntimeError(f"posttrain {method} {result.state}: {result.error}")
        last = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()][-1]
        dtype = "fp32+bf16-autocast" if last.get("autocast") == "bf16" else "fp32"
        checkpointing = bool(last.get("gradient_checkpointing"))
    seconds = starts[-1] - marks["start"]
    timed_steps = steps - 1
    row: dict[str, Any] = {"timed_steps": timed_steps, "timed_seconds": round(seconds, 2),
                           "peak_rss_mb": round(peak_rss_mb(), 1), "dtype": dtype,
                           "gradient_checkpointing": checkpointing}
    if method == "dpo":
        row["pairs_per_s"] = round(timed_steps * batch / seconds, 3)
    else:
        gen_seconds = generation["seconds"] - marks["generation"]["seconds"]
        gen_tokens = generation["tokens"] - marks["generation"]["tokens"]
        row["generated_tokens_per_s"] = round(gen_tokens / gen_seconds, 1)
        # Update: everything but generation (scoring, reference and policy log-probs, backward, step) over the
        # completion tokens it trains on.
        row["update_tokens_per_s"] = round(gen_tokens / max(1e-9, seconds - gen_seconds), 1)
        row["generated_tokens"] = gen_tokens
    return row


def _stock_trainer(method: str, paths: dict[str, str], settings: RealSettings, out_dir: Path, callback):
    """TRL's trainer for ``method`` with its defaults; only the run length, batch and LoRA are set."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer

    from posttrain.data import load_training_data
    from posttrain.rewards import resolve_reward_functions
    from posttrain.spec import DataSpec

    tokenizer = AutoTokenizer.from_pretrained(paths["model"])
    model = AutoModelForCausalLM.from_pretrained(paths["model"], dtype=torch.float32)
    common = {"output_dir": str(out_dir), "seed": SEED, "logging_steps": 1, "save_strategy": "no",
              "report_to": [], "disable_tqdm": True, "use_cpu": True, "learning_rate": 1e-5}
    if method == "dpo":
        data = load_training_data(DataSpec(source=paths["preference"]), "dpo", seed=SEED)
        config = DPOConfig(**common, max_steps=settings.dpo_steps, per_device_train_batch_size=settings.dpo_batch_size,
                           beta=0.1)
        return DPOTrainer(model=model, args=config, processing_class=tokenizer, train_dataset=data.train,
                          peft_config=lora_config(settings), callbacks=[callback])
    data = load_training_data(DataSpec(source=paths["gsm8k"]), "grpo", seed=SEED)
    tokenizer.padding_side = "left"
    config = GRPOConfig(**common, max_steps=settings.grpo_steps, per_device_train_batch_size=settings.grpo_batch_size,
                        num_generations=settings.grpo_num_generations,
                        max_completion_length=settings.grpo_max_completion_length)
    return GRPOTrainer(model=model, reward_funcs=resolve_reward_functions(["numeric_match", "answer_format"]),
                       args=config, processing_class=tokenizer, train_dataset=data.train, callbacks=[callback])


def run_real_child(tag: str, paths: dict[str, str], settings: RealSettings, out_dir: Path) -> dict[str, Any]:
    """Child entry: ``tag`` is ``real:<lora|full>:<variant>``, ``real:<dpo|grpo>:<variant>`` or ``real:peak``."""
    from bench.sft_throughput import StepClock

    parts = tag.split(":")
    if parts[1] == "peak":
        return matmul_peak_gflops()
    method, variant = parts[1], parts[2]
    if method in ("dpo", "grpo"):
        return run_method_line(method, variant, paths, settings, out_dir)
    # The peak is measured again in each variant's own process, just before it trains: other work on the
    # machine moves both numbers, so each variant's MFU is taken against the peak of its own moment.
    peak = matmul_peak_gflops(repeats=3)
    clock = StepClock(settings.warmup)
    if variant == "posttrain":
        row = run_real_posttrain(method, paths, settings, out_dir, clock)
    else:
        row = run_real_trl(method, variant, paths, settings, out_dir, clock)
    return {**row, "matmul_peak_gflops_at_start": peak}


# ---------------------------------------------------------------------------------------------------------
# Parent


def run_real_suite(work: Path, settings: RealSettings, spawn,
                   methods: tuple[str, ...] = (*REAL_METHODS, "dpo", "grpo")) -> dict[str, Any]:
    """Every real-model run, each in its own process via ``spawn(tag, paths, settings_dict, work)``."""
    from transformers import AutoConfig, AutoTokenizer

    paths = prepare_real(work, settings)
    tokenizer = AutoTokenizer.from_pretrained(paths["model"])
    config = AutoConfig.from_pretrained(paths["model"])
    stats = row_stats(tokenizer, paths["train"], settings.max_seq_length)
    print("measuring the matmul peak ...", file=sys.stderr, flush=True)
    peak = {key: value for key, value in spawn("real:peak", paths, asdict(settings), work).items()
            if key in ("fp32", "bf16")}
    report: dict[str, Any] = {}
    for method in (m for m in REAL_METHODS if m in methods):
        rows = {}
        for variant in REAL_VARIANTS:
            tag = f"real:{method}:{variant}"
            print(f"running {tag} ...", file=sys.stderr, flush=True)
            rows[variant] = spawn(tag, paths, asdict(settings), work)
        lora_params = rows["stock_trl"].get("trainable_params", 0) if method == "lora" else 0
        flops = model_flops_per_token(config, method, stats, lora_params)
        for row in rows.values():
            row["model_flops_per_real_token"] = round(flops)
            dtype = "bf16" if "bf16" in row["dtype"] else "fp32"
            peak_gflops = max(peak[dtype], row["matmul_peak_gflops_at_start"][dtype])
            row["matmul_peak_gflops"] = peak_gflops
            row["mfu"] = round(flops * row["real_tokens_per_s"] / (peak_gflops * 1e9), 4)
        rows["ratios"] = {
            "posttrain_over_tuned_trl": round(rows["posttrain"]["real_tokens_per_s"]
                                              / rows["tuned_trl"]["real_tokens_per_s"], 3),
            "posttrain_over_stock_trl": round(rows["posttrain"]["real_tokens_per_s"]
                                              / rows["stock_trl"]["real_tokens_per_s"], 3),
        }
        report[method] = rows
    for method in (m for m in ("dpo", "grpo") if m in methods):
        report[method] = {}
        for variant in ("stock_trl", "posttrain"):
            tag = f"real:{method}:{variant}"
            print(f"running {tag} ...", file=sys.stderr, flush=True)
            report[method][variant] = spawn(tag, paths, asdict(settings), work)
    report["data"] = {key: round(value, 3) for key, value in stats.items()}
    report["matmul_peak_gflops_1_thread"] = peak
    report["settings"] = {**asdict(settings), "model": "posttrain:smollm2 (SmolLM2-135M-Instruct)", "seed": SEED}
    return report


def print_real_table(real: dict[str, Any]) -> None:
    print(f"\nreal model: SmolLM2-135M-Instruct, {real['data']['mean_tokens']:.0f} tokens/row, "
          f"{real['data']['trained_fraction']:.0%} trained; matmul peak {real['matmul_peak_gflops_1_thread']}")
    print(f"{'method':<5} {'variant':<10} {'real tok/s':>10} {'eval loss':>9} {'peak RSS MB':>11} {'MFU':>6}  dtype")
    for method in REAL_METHODS:
        for variant in REAL_VARIANTS:
            row = real.get(method, {}).get(variant)
            if row:
                print(f"{method:<5} {variant:<10} {row['real_tokens_per_s']:>10.1f} {row['eval_loss']:>9.3f} "
                      f"{row['peak_rss_mb']:>11.0f} {row['mfu']:>6.1%}  {row['dtype']}")
        if method in real:
            print(f"{method}: {real[method]['ratios']}")
    for method in ("dpo", "grpo"):
        for variant, row in real.get(method, {}).items():
            print(f"{method} {variant}: {json.dumps(row)}")
