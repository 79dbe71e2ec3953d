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
    steps: int = 6
    warmup: int = 2
    train_rows: int = 240
    eval_rows: int = 16
    max_seq_length: int = 512
    lora_r: int = 16
    lora_alpha: int = 32
    lora_learning_rate: float = 2e-4
    full_learning_rate: float = 2e-5
    # Chat rows are built from the bundled alpaca sample's sentences: a prompt of an instruction plus up to
    # ``max_context_sentences`` of context, a reply of 1..``max_reply_sentences`` sentences.
    max_context_sentences: int = 24
    max_reply_sentences: int = 40
    # DPO / reward lines: pairs built from the same chat rows (a prompt, its reply as chosen, another row's reply
    # as rejected), one epoch of `pair_steps` x `pair_batch_size` pairs, LoRA.
    pair_steps: int = 9
    pair_batch_size: int = 4
    pair_max_context_sentences: int = 8
    pair_max_reply_sentences: int = 12
    # GRPO line (LoRA, the bundled GSM8K sample) and the rollout line (generation alone, at GRPO's and PPO's
    # batch sizes).
    grpo_steps: int = 3
    grpo_batch_size: int = 8
    grpo_num_generations: int = 4
    grpo_max_completion_length: int = 48
    rollout_batch_sizes: tuple[int, ...] = (8, 32)
    rollout_tokens: int = 32
    # Each variant of each line runs this many times, interleaved (A B C A B C ...), each in a fresh process.
    repeats: int = 3
    # torch.compile for tuned TRL (TrainingArguments.torch_compile with Accelerate's regional compilation).
    tuned_compile: bool = True
    # Stock TRL takes part (the quick run leaves it out: it checks the shape, with the baseline and posttrain),
    # in the first `stock_repeats` rounds only: no target is measured against it, and it is the slowest run.
    stock: bool = True
    stock_repeats: int = 1
    # posttrain's training.compile (quick: off, since compiling SmolLM2 takes longer than a toy run).
    posttrain_compile: str | bool = "auto"

    @classmethod
    def quick(cls) -> RealSettings:
        return cls(batch_size=2, steps=2, warmup=1, train_rows=8, eval_rows=2, max_seq_length=96,
                   max_context_sentences=1, max_reply_sentences=2, pair_steps=2, pair_batch_size=2,
                   pair_max_context_sentences=1, pair_max_reply_sentences=1, grpo_steps=2,
                   grpo_batch_size=4, grpo_num_generations=2, grpo_max_completion_length=8,
                   rollout_batch_sizes=(4,), rollout_tokens=4, repeats=1, tuned_compile=False, stock=False,
                   posttrain_compile=False)


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
    paths["pairs"] = str(work / "pairs.jsonl")
    pairs = make_pair_rows(settings.pair_steps * settings.pair_batch_size, SEED + 2, settings)
    Path(paths["pairs"]).write_text("".join(json.dumps(row) + "\n" for row in pairs), encoding="utf-8")
    return paths


def make_pair_rows(count: int, seed: int, settings: RealSettings) -> list[dict[str, str]]:
    """Preference rows (prompt, chosen, rejected) for DPO and reward: a chat row's prompt and reply, and the reply
    of the next row as the rejected answer; deterministic per seed."""
    shape = RealSettings(max_context_sentences=settings.pair_max_context_sentences,
                         max_reply_sentences=settings.pair_max_reply_sentences)
    rows = make_chat_rows(2 * count, seed, shape)
    return [{"prompt": "\n\n".join(part for part in (a["instruction"], a["input"]) if part),
             "chosen": a["output"], "rejected": b["output"]} for a, b in zip(rows[::2], rows[1::2], strict=True)]


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
    if method == "generate":  # forward only, the head for every generated token
        return float(2 * body + 2 * head + 4 * layers * q_dim * stats["mean_context"])
    full = method == "full"
    linear = (6 if full else 4) * body + (6 if full else 4) * head * stats["trained_fraction"] + 6 * lora_params
    attention = 3 * 4 * layers * q_dim * stats["mean_context"]
    return float(linear + attention)


def matmul_peak_gflops(threads: int = 1, sizes: tuple[int, ...] = (1024, 2048), repeats: int = 5) -> dict[str, float]:
    """Best GFLOPS of ``repeats`` square matmuls of each size, fp32 and bf16, on ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        best = 0.0
        for size in sizes:
            a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
            a @ b
            seconds = min(_timed(lambda a=a, b=b: a @ b) for _ in range(repeats))
            best = max(best, 2 * size**3 / seconds / 1e9)
        out[name] = round(best, 1)
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

    from bench.sft_throughput import final_loss, peak_rss_mb
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
        kwargs.update(**tuned_trl_arguments(settings), train_sampling_strategy="group_by_length")
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
        "compiled": bool(config.torch_compile),
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
                     "logging_steps": 1, "compile": settings.posttrain_compile},
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
        "compiled": bool(last.get("compiled_layers")),
    }


def run_method_line(method: str, variant: str, paths: dict[str, str], settings: RealSettings,
                    out_dir: Path) -> dict[str, Any]:
    """DPO or reward pairs/s, or GRPO generated and update tokens/s, LoRA on the real model, for one variant."""
    import torch
    from trl import GRPOTrainer

    from bench.sft_throughput import peak_rss_mb

    torch.set_num_threads(1)
    generation = {"seconds": 0.0, "tokens": 0, "prompt_tokens": 0, "sequences": 0}
    original = GRPOTrainer._generate

    def timed_generate(self, prompts):
        start = time.perf_counter()
        out = original(self, prompts)
        generation["seconds"] += time.perf_counter() - start
        generation["tokens"] += sum(len(ids) for ids in out[1])
        generation["prompt_tokens"] += sum(len(ids) for ids in out[0])
        generation["sequences"] += len(out[1])
        return out

    GRPOTrainer._generate = timed_generate  # the same wrapper for every variant: measurement only
    steps = settings.grpo_steps if method == "grpo" else settings.pair_steps
    batch = settings.grpo_batch_size if method == "grpo" else settings.pair_batch_size
    starts: list[float] = []
    marks: dict[str, Any] = {}

    from transformers import TrainerCallback

    class Marks(TrainerCallback):
        def on_train_begin(self, args, state, control, **_):
            marks["train_begin"] = time.perf_counter()

        def on_step_begin(self, args, state, control, **_):
            if state.global_step == 1:  # the first step is warm-up (and compilation)
                marks["start"] = time.perf_counter()
                marks["generation"] = dict(generation)

        def on_step_end(self, args, state, control, **_):
            starts.append(time.perf_counter())

    built = time.perf_counter()
    if variant in ("stock_trl", "tuned_trl"):
        trainer = _trl_method_trainer(method, variant, paths, settings, out_dir, Marks())
        trainer.train()
        dtype = "fp32+bf16-autocast" if trainer.args.bf16 else "fp32"
        checkpointing = bool(trainer.args.activation_checkpointing)
        compiled = bool(trainer.args.torch_compile)
        attention = trainer.accelerator.unwrap_model(trainer.model).config._attn_implementation
    else:
        from posttrain.spec import spec_from_dict
        from posttrain.worker import run_worker

        method_spec = ({"name": "dpo", "beta": 0.1} if method == "dpo" else {"name": "reward"} if method == "reward"
                       else {"name": "grpo", "num_generations": settings.grpo_num_generations,
                             "max_completion_length": settings.grpo_max_completion_length,
                             "reward_functions": ["numeric_match", "answer_format"]})
        spec = spec_from_dict({
            "name": f"bench-{method}", "model": {"name_or_path": paths["model"]}, "method": method_spec,
            "data": {"source": paths["gsm8k" if method == "grpo" else "pairs"]},
            "peft": {"type": "lora", "r": settings.lora_r, "alpha": settings.lora_alpha},
            "training": {"max_steps": steps, "per_device_train_batch_size": batch, "seed": SEED,
                         "logging_steps": 1, "learning_rate": 1e-5, "max_seq_length": settings.max_seq_length,
                         "compile": settings.posttrain_compile},
            "tracking": {"report_to": []},
        })
        result = run_worker(spec, out_dir, log_to_file=False, extra_callbacks=[Marks()])
        if result.state != "succeeded":
            raise RuntimeError(f"posttrain {method} {result.state}: {result.error}")
        last = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()][-1]
        dtype = "fp32+bf16-autocast" if last.get("autocast") == "bf16" else "fp32"
        checkpointing = bool(last.get("gradient_checkpointing"))
        compiled = bool(last.get("compiled_layers"))
        attention = last.get("attn_implementation")
    seconds = starts[-1] - marks["start"]
    timed_steps = steps - 1
    row: dict[str, Any] = {"timed_steps": timed_steps, "timed_seconds": round(seconds, 2),
                           "setup_seconds": round(marks["train_begin"] - built, 1),
                           "peak_rss_mb": round(peak_rss_mb(), 1), "dtype": dtype,
                           "gradient_checkpointing": checkpointing, "compiled": compiled, "attention": attention}
    if method in ("dpo", "reward"):
        row["pairs_per_s"] = round(timed_steps * batch / seconds, 3)
    else:
        gen_seconds = generation["seconds"] - marks["generation"]["seconds"]
        gen_tokens = generation["tokens"] - marks["generation"]["tokens"]
        row["generated_tokens_per_s"] = round(gen_tokens / gen_seconds, 1)
        # Update: everything but generation (scoring, log-probs, backward, step) over the completion tokens it
        # trains on.
        row["update_tokens_per_s"] = round(gen_tokens / max(1e-9, seconds - gen_seconds), 1)
        row["generated_tokens"] = gen_tokens
        row["prompt_tokens"] = generation["prompt_tokens"] - marks["generation"]["prompt_tokens"]
        row["sequences"] = generation["sequences"] - marks["generation"]["sequences"]
    return row


def _trl_method_trainer(method: str, variant: str, paths: dict[str, str], settings: RealSettings, out_dir: Path,
                        callback):
    """TRL's trainer for ``method``: its defaults (stock) or every setting a TRL user can set (tuned)."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, RewardConfig, RewardTrainer

    from posttrain.data import load_training_data
    from posttrain.rewards import resolve_reward_functions
    from posttrain.spec import DataSpec

    tuned = variant == "tuned_trl"
    tokenizer = AutoTokenizer.from_pretrained(paths["model"])
    attention = {"attn_implementation": "eager"} if tuned else {}
    common: dict[str, Any] = {
        "output_dir": str(out_dir), "seed": SEED, "logging_steps": 1, "save_strategy": "no", "report_to": [],
        "disable_tqdm": True, "use_cpu": True, "learning_rate": 1e-5}
    if tuned:
        common.update(tuned_trl_arguments(settings))
    if method in ("dpo", "reward"):
        data = load_training_data(DataSpec(source=paths["pairs"]), method, seed=SEED)
        pair = {"max_steps": settings.pair_steps, "per_device_train_batch_size": settings.pair_batch_size,
                "max_length": settings.max_seq_length}
        if method == "dpo":
            model = AutoModelForCausalLM.from_pretrained(paths["model"], dtype=torch.float32, **attention)
            # Tuned: the reference is frozen, so its log-probs are computed once before training (TRL's setting).
            config = DPOConfig(**common, **pair, beta=0.1, **({"precompute_ref_log_probs": True} if tuned else {}))
            return DPOTrainer(model=model, args=config, processing_class=tokenizer, train_dataset=data.train,
                              peft_config=lora_config(settings), callbacks=[callback])
        model = AutoModelForSequenceClassification.from_pretrained(paths["model"], num_labels=1,
                                                                   dtype=torch.float32, **attention)
        model.config.pad_token_id = tokenizer.pad_token_id
        config = RewardConfig(**common, **pair)
        peft = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=0.0,
                          target_modules="all-linear", modules_to_save=["score"], task_type="SEQ_CLS")
        return RewardTrainer(model=model, args=config, processing_class=tokenizer, train_dataset=data.train,
                             peft_config=peft, callbacks=[callback])
    model = AutoModelForCausalLM.from_pretrained(paths["model"], dtype=torch.float32, **attention)
    data = load_training_data(DataSpec(source=paths["gsm8k"]), "grpo", seed=SEED)
    tokenizer.padding_side = "left"
    if tuned:
        # Generation runs through the training model here: compiling it would recompile for every decode step.
        common.pop("torch_compile", None)
    config = GRPOConfig(**common, max_steps=settings.grpo_steps, per_device_train_batch_size=settings.grpo_batch_size,
                        num_generations=settings.grpo_num_generations,
                        max_completion_length=settings.grpo_max_completion_length)
    return GRPOTrainer(model=model, reward_funcs=resolve_reward_functions(["numeric_match", "answer_format"]),
                       args=config, processing_class=tokenizer, train_dataset=data.train,
                       peft_config=lora_config(settings), callbacks=[callback])


def tuned_trl_arguments(settings: RealSettings) -> dict[str, Any]:
    """What a TRL user can set in any of its configs for this CPU: bf16 autocast only where the CPU has native
    bf16, no recomputation, and torch.compile where ``settings.tuned_compile``, with Accelerate's regional
    compilation (each repeated block compiled once) and dynamic shapes (one graph for every batch length), set
    by environment variable as `accelerate config` does: without them the first batches of new lengths
    recompiled the whole model (a timed step of ~60 s in a first trial)."""
    import os

    from bench.sft_throughput import cpu_has_native_bf16

    arguments: dict[str, Any] = {"bf16": cpu_has_native_bf16(), "activation_checkpointing": False}
    if settings.tuned_compile:
        os.environ["ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION"] = "1"
        os.environ["ACCELERATE_DYNAMO_USE_DYNAMIC"] = "1"
        arguments["torch_compile"] = True
    return arguments


def run_rollout_line(variant: str, paths: dict[str, str], settings: RealSettings) -> dict[str, Any]:
    """Generated tokens/s of one batch of rollouts, at each batch size GRPO and PPO sample (8: PPO's 4-16 rollouts
    and a GRPO step's 2 prompts x 4; 32: 8 prompts x 4), from SmolLM2 with a LoRA adapter as the trainers hold it
    (fp32 weights, PEFT-wrapped). ``hf_generate``: ``model.generate`` on that model, as TRL's GRPO loop calls it;
    ``posttrain``: ``generate_batch`` (one KV cache for the batch) on the refreshed bf16 merged copy, as posttrain's
    GRPO rollouts run (the refresh is timed too). Every row samples exactly ``rollout_tokens`` tokens
    (EOS ignored), so both produce the same count."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.sft_throughput import peak_rss_mb
    from posttrain.data import load_training_data
    from posttrain.generation_copy import GenerationCopy
    from posttrain.inference.generation import SamplingParams, generate_batch
    from posttrain.spec import DataSpec

    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(paths["model"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(paths["model"], dtype=torch.float32),
                           lora_config(settings))
    rows = load_training_data(DataSpec(source=paths["gsm8k"]), "grpo", seed=SEED).train
    copy = GenerationCopy(model) if variant == "posttrain" else None
    out: dict[str, Any] = {"batches": {}}
    for size in settings.rollout_batch_sizes:
        prompts = [list(ids) for ids in tokenizer.apply_chat_template(
            [rows[i % len(rows)]["prompt"] for i in range(size)], add_generation_prompt=True, tokenize=True,
            return_dict=True)["input_ids"]]
        timings = []
        for _ in range(2):  # the first is warm-up
            start = time.perf_counter()
            if copy is not None:
                params = SamplingParams(max_tokens=settings.rollout_tokens, temperature=1.0, ignore_eos=True)
                results = generate_batch(copy.refresh(), tokenizer, prompts, [params] * size)
                tokens = sum(len(r.completions[0].token_ids) for r in results)
            else:
                tokenizer.padding_side = "left"
                batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
                with torch.no_grad():
                    ids = model.generate(**batch, do_sample=True, temperature=1.0, max_new_tokens=settings.rollout_tokens,
                                         min_new_tokens=settings.rollout_tokens, pad_token_id=tokenizer.pad_token_id)
                tokens = (ids.shape[1] - batch["input_ids"].shape[1]) * size
            timings.append((time.perf_counter() - start, tokens))
        seconds, tokens = timings[-1]
        out["batches"][str(size)] = {"tokens_per_s": round(tokens / seconds, 1), "seconds": round(seconds, 2),
                                     "tokens": tokens, "mean_prompt_tokens": round(sum(map(len, prompts)) / size, 1)}
    out["tokens_per_s"] = out["batches"][str(max(settings.rollout_batch_sizes))]["tokens_per_s"]
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    out["dtype"] = "bf16 (merged copy)" if copy is not None else "fp32 (PEFT-wrapped)"
    return out


def run_real_child(tag: str, paths: dict[str, str], settings: RealSettings, out_dir: Path) -> dict[str, Any]:
    """Child entry: ``tag`` is ``real:<line>:<variant>[:<repeat>]`` or ``real:peak``."""
    from bench.sft_throughput import StepClock

    parts = tag.split(":")
    if parts[1] == "peak":
        return matmul_peak_gflops()
    line, variant = parts[1], parts[2]
    # The peak is measured again in each run's own process, just before it works: other load on the machine
    # moves both numbers, so each run's MFU is taken against the peak of its own moment.
    peak = matmul_peak_gflops(repeats=3)
    if line == "rollout":
        row = run_rollout_line(variant, paths, settings)
    elif line in METHOD_LINES:
        row = run_method_line(line, variant, paths, settings, out_dir)
    else:
        clock = StepClock(settings.warmup)
        if variant == "posttrain":
            row = run_real_posttrain(line, paths, settings, out_dir, clock)
        else:
            row = run_real_trl(line, variant, paths, settings, out_dir, clock)
    return {**row, "matmul_peak_gflops_at_start": peak}


# ---------------------------------------------------------------------------------------------------------
# Parent


METHOD_LINES = ("dpo", "reward", "grpo")
LINES = (*REAL_METHODS, *METHOD_LINES, "rollout")
# Per line: the variants (the baseline second to last, posttrain last), the rate compared, its target.
LINE_VARIANTS = {line: REAL_VARIANTS for line in (*REAL_METHODS, *METHOD_LINES)} | {
    "rollout": ("hf_generate", "posttrain")}
LINE_METRIC = {"lora": "real_tokens_per_s", "full": "real_tokens_per_s", "dpo": "pairs_per_s",
               "reward": "pairs_per_s", "grpo": "update_tokens_per_s", "rollout": "tokens_per_s"}
TARGETS = {"lora": 2.0, "full": 2.0, "dpo": 1.5, "reward": 1.5, "grpo": 1.5, "rollout": None}


def spread(values: list[float]) -> dict[str, Any]:
    ordered = sorted(values)
    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return {"runs": values, "median": round(median, 3), "min": ordered[0], "max": ordered[-1]}


def compare(posttrain: list[float], baseline: list[float], target: float | None) -> dict[str, Any]:
    """The issue's rule: a target is met when the slowest posttrain run beats the fastest baseline run by it, or
    when the medians do and the spreads do not overlap."""
    ours, theirs = spread(posttrain), spread(baseline)
    ratio = round(ours["median"] / theirs["median"], 3)
    worst = round(ours["min"] / theirs["max"], 3)
    met = None if target is None else bool(worst >= target or (ratio >= target and ours["min"] > theirs["max"]))
    return {"ratio_of_medians": ratio, "slowest_over_fastest": worst, "target": target, "met": met}


def line_flops(line: str, config, row: dict[str, Any], stats: dict[str, dict[str, float]], lora_params: int) -> float:
    """Model FLOPs per unit of the line's rate (per real token, pair or generated token), counted one way for
    every line: forward + backward as the method trains (LoRA: no weight gradients for the frozen base), the LM
    head only where a log-prob is needed, causal attention scores; the reward head and cached reference passes
    are left out."""
    if line in REAL_METHODS:
        return model_flops_per_token(config, line, stats["sft"], lora_params)
    if line in ("dpo", "reward"):
        pair = stats["pairs"]
        head = pair if line == "dpo" else {**pair, "trained_fraction": 0.0}
        return model_flops_per_token(config, "lora", head, lora_params) * pair["tokens_per_pair"]
    if line == "grpo":
        generated, prompt = row["generated_tokens"], row["prompt_tokens"]
        per_sequence = (generated + prompt) / max(1, row.get("sequences") or 1)
        grpo = {"trained_fraction": generated / (generated + prompt), "mean_context": per_sequence / 2}
        return model_flops_per_token(config, "lora", grpo, lora_params) * (generated + prompt) / generated
    batch = row["batches"][str(max(int(size) for size in row["batches"]))]
    context = batch["mean_prompt_tokens"] + batch["tokens"] / (2 * int(max(row["batches"], key=int)))
    return model_flops_per_token(config, "generate", {"trained_fraction": 1.0, "mean_context": context}, 0)


def run_real_suite(work: Path, settings: RealSettings, spawn, lines: tuple[str, ...] = LINES) -> dict[str, Any]:
    """Every real-model run, each in its own process via ``spawn(tag, paths, settings_dict, work, tag=...)``: per
    line, its variants ``settings.repeats`` times, interleaved (A B C A B C ...)."""
    from transformers import AutoConfig, AutoTokenizer

    paths = prepare_real(work, settings)
    tokenizer = AutoTokenizer.from_pretrained(paths["model"])
    config = AutoConfig.from_pretrained(paths["model"])
    stats = {"sft": row_stats(tokenizer, paths["train"], settings.max_seq_length),
             "pairs": pair_stats(tokenizer, paths["pairs"], settings.max_seq_length)}
    print("measuring the matmul peak ...", file=sys.stderr, flush=True)
    peak = {key: value for key, value in spawn("real:peak", paths, asdict(settings), work).items()
            if key in ("fp32", "bf16")}
    lora_params = lora_parameter_count(config, settings)
    report: dict[str, Any] = {}
    for line in (name for name in LINES if name in lines):
        variants = tuple(v for v in LINE_VARIANTS[line] if settings.stock or v != "stock_trl")
        runs: dict[str, list[dict[str, Any]]] = {variant: [] for variant in variants}
        for repeat in range(settings.repeats):
            for variant in variants:
                if variant == "stock_trl" and repeat >= settings.stock_repeats:
                    continue
                tag = f"real:{line}:{variant}:{repeat}"
                print(f"running {tag} ...", file=sys.stderr, flush=True)
                row = spawn(tag, paths, asdict(settings), work, tag=tag)
                flops = line_flops(line, config, row, stats, 0 if line == "full" else lora_params)
                dtype = "bf16" if "bf16" in row["dtype"] else "fp32"
                row["matmul_peak_gflops"] = max(peak[dtype], row["matmul_peak_gflops_at_start"][dtype])
                row["model_flops_per_unit"] = round(flops)
                row["mfu"] = round(flops * row[LINE_METRIC[line]] / (row["matmul_peak_gflops"] * 1e9), 4)
                runs[variant].append(row)
        metric = LINE_METRIC[line]
        baseline, ours = variants[-2], variants[-1]
        section: dict[str, Any] = {"metric": metric, "baseline": baseline, "runs": runs, "summary": {
            variant: {metric: spread([row[metric] for row in rows]), "mfu": spread([row["mfu"] for row in rows]),
                      "peak_rss_mb": spread([row["peak_rss_mb"] for row in rows]),
                      **({"eval_loss": spread([row["eval_loss"] for row in rows])} if "eval_loss" in rows[0] else {}),
                      **({"generated_tokens_per_s": spread([row["generated_tokens_per_s"] for row in rows])}
                         if line == "grpo" else {})}
            for variant, rows in runs.items()}}
        section["posttrain_over_baseline"] = compare([row[metric] for row in runs[ours]],
                                                     [row[metric] for row in runs[baseline]], TARGETS[line])
        if line == "grpo":
            section["generation_posttrain_over_baseline"] = compare(
                [row["generated_tokens_per_s"] for row in runs[ours]],
                [row["generated_tokens_per_s"] for row in runs[baseline]], None)
        report[line] = section
    report["data"] = {name: {key: round(value, 3) for key, value in values.items()} for name, values in stats.items()}
    report["matmul_peak_gflops_1_thread"] = peak
    report["settings"] = {**asdict(settings), "model": "posttrain:smollm2 (SmolLM2-135M-Instruct)", "seed": SEED}
    return report


def pair_stats(tokenizer, path: str, max_length: int) -> dict[str, float]:
    """Per preference pair: tokens of chosen + rejected (each prompt + answer), the answers' share, and the mean
    causal context, in SmolLM2's chat template."""
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    total = trained = context = 0
    for row in rows:
        prompt = [{"role": "user", "content": row["prompt"]}]
        start = len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"])
        for answer in (row["chosen"], row["rejected"]):
            ids = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": answer}], tokenize=True,
                                                return_dict=True)["input_ids"][:max_length]
            total += len(ids)
            trained += max(0, len(ids) - start)
            context += len(ids) * (len(ids) + 1) / 2
    return {"tokens_per_pair": total / len(rows), "trained_fraction": trained / total, "mean_context": context / total}


def lora_parameter_count(config, settings: RealSettings) -> int:
    """Trainable parameters of LoRA r on every linear layer of the decoder (the head is tied and frozen)."""
    text = config.get_text_config()
    hidden = text.hidden_size
    head_dim = getattr(text, "head_dim", None) or hidden // text.num_attention_heads
    q_dim, kv_dim = text.num_attention_heads * head_dim, text.num_key_value_heads * head_dim
    shapes = [(hidden, q_dim), (hidden, kv_dim), (hidden, kv_dim), (q_dim, hidden),
              (hidden, text.intermediate_size), (hidden, text.intermediate_size), (text.intermediate_size, hidden)]
    return text.num_hidden_layers * sum(settings.lora_r * (a + b) for a, b in shapes)


def print_real_table(real: dict[str, Any]) -> None:
    print(f"\nreal model: SmolLM2-135M-Instruct; matmul peak {real.get('matmul_peak_gflops_1_thread')}")
    print(f"{'line':<8} {'variant':<12} {'rate':>22} {'median':>9} {'min':>9} {'max':>9} {'MFU':>6}")
    for line in LINES:
        section = real.get(line)
        if not section:
            continue
        for variant, summary in section["summary"].items():
            rate = summary[section["metric"]]
            print(f"{line:<8} {variant:<12} {section['metric']:>22} {rate['median']:>9.2f} {rate['min']:>9.2f} "
                  f"{rate['max']:>9.2f} {summary['mfu']['median']:>6.1%}")
        print(f"{line}: {section['posttrain_over_baseline']}")
