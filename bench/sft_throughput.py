"""SFT throughput: stock TRL, hand-tuned TRL, a plain PyTorch loop and posttrain, on the same model and data.

    .venv/bin/python bench/sft_throughput.py            # full run (~10 min on 2 CPU cores)
    .venv/bin/python bench/sft_throughput.py --quick    # smoke run: tiny model, a few steps

Every variant trains the same random-init Llama (hidden 256, 4 layers, the posttrain:tiny tokenizer) on
the same variable-length text rows (16-480 tokens), full fine-tune, with the same batch size, step count,
learning rate, schedule and seed, each in a fresh subprocess so thread settings and memory do not leak.
Throughput counts real (non-padding) tokens over the wall time of the timed steps only: model loading,
tokenization and the first ``--warmup`` steps are excluded. Every variant is then scored on the same
held-out rows in fp32 (``eval_loss``), so a faster variant cannot hide a worse model. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: bench.real_model must import as a package module
    sys.path.insert(0, str(REPO_ROOT))
DEFAULT_OUTPUT = REPO_ROOT / "bench" / "results" / "sft_throughput.json"
VARIANTS = ("stock_trl", "tuned_trl", "plain_loop", "posttrain")
LEARNING_RATE = 2e-4
SEED = 42
EVAL_ROWS = 32
STUDY_STEPS, STUDY_WARMUP = 12, 3


@dataclass
class Settings:
    """What every variant shares; written into the results so a run can be reproduced."""

    hidden_size: int = 256
    num_layers: int = 4
    batch_size: int = 8
    steps: int = 40
    warmup: int = 4
    train_rows: int = 1000
    min_tokens: int = 16
    max_tokens: int = 480
    # Overrides for the thread and dtype study: threads of tuned_trl and posttrain; posttrain's model.dtype.
    num_threads: int | None = None
    model_dtype: str = "auto"
    attn_implementation: str | None = None  # tuned_trl only
    # The token-budget suite: posttrain's training.tokens_per_batch, and whole epochs instead of `steps`.
    tokens_per_batch: int | None = None
    epochs: float | None = None
    max_seq_length: int | None = None
    peft: str = "none"

    @classmethod
    def quick(cls) -> Settings:
        return cls(hidden_size=64, num_layers=2, batch_size=4, steps=3, warmup=1, train_rows=40, max_tokens=64)


# ---------------------------------------------------------------------------------------------------------
# Shared set-up: model folder and dataset, built once by the parent process.


def corpus_words() -> list[str]:
    from posttrain.tiny import sample_path

    words: list[str] = []
    for line in sample_path("alpaca").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        words.extend(" ".join(str(row.get(key, "")) for key in ("instruction", "input", "output")).split())
    return words


def make_rows(tokenizer, count: int, settings: Settings, seed: int) -> list[dict[str, str]]:
    """``count`` text rows whose token counts (BOS + text + EOS, as TRL tokenizes them) spread uniformly
    over [min_tokens, max_tokens]; deterministic for a given seed."""
    words = corpus_words()
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        target = rng.randint(settings.min_tokens, settings.max_tokens)
        start = rng.randrange(len(words))
        window = (words[start:] + words)[: target * 2]
        # The longest prefix of the word window that tokenizes to at most `target` tokens (+2: BOS and EOS).
        lo, hi = 1, len(window)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(tokenizer(" ".join(window[:mid]))["input_ids"]) + 1 <= target:
                lo = mid
            else:
                hi = mid - 1
        rows.append({"text": " ".join(window[:lo])})
    return rows


def prepare(work: Path, settings: Settings) -> dict[str, str]:
    from transformers import AutoTokenizer

    from posttrain.tiny import build_tiny_model

    model_dir = work / "model"
    build_tiny_model(model_dir, hidden_size=settings.hidden_size, num_layers=settings.num_layers)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    paths = {"model": str(model_dir), "train": str(work / "train.jsonl"), "eval": str(work / "eval.jsonl")}
    for name, count, seed in (("train", settings.train_rows, SEED), ("eval", EVAL_ROWS, SEED + 1)):
        rows = make_rows(tokenizer, count, settings, seed)
        Path(paths[name]).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return paths


# ---------------------------------------------------------------------------------------------------------
# Measurement helpers used inside each variant's subprocess.


def tokenize_rows(tokenizer, path: str) -> list[list[int]]:
    """Token ids exactly as TRL's SFTTrainer makes them from a text row: BOS + text + EOS."""
    rows = [json.loads(line)["text"] for line in Path(path).read_text(encoding="utf-8").splitlines() if line]
    eos = tokenizer.eos_token_id
    out = []
    for text in rows:
        ids = tokenizer(text)["input_ids"]
        out.append(ids if ids and ids[-1] == eos else [*ids, eos])
    return out


def eval_loss(model, tokenizer, path: str) -> float:
    """Mean next-token loss over every token of the held-out rows, in fp32, one row at a time (no padding)."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in tokenize_rows(tokenizer, path):
            tensor = torch.tensor([ids])
            logits = model(input_ids=tensor).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], tensor[0, 1:], reduction="sum")
            total, count = total + loss.item(), count + len(ids) - 1
    return total / count


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class StepClock:
    """Wall time and real-token count between the end of the warm-up steps and the end of the last step."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start: tuple[float, int] | None = None
        self.end: tuple[float, int] | None = None
        self.losses: list[float] = []

    def step_done(self, step: int, tokens_seen: int) -> None:
        now = time.perf_counter()
        if step == self.warmup:
            self.start = (now, tokens_seen)
        self.end = (now, tokens_seen)

    def callback(self):
        """The TrainerCallback that feeds this clock; every Trainer-based variant is timed through it."""
        from transformers import TrainerCallback

        clock = self

        class Clock(TrainerCallback):
            def on_step_end(self, args, state, control, **_):
                clock.step_done(state.global_step, int(state.num_input_tokens_seen))

            def on_log(self, args, state, control, logs=None, **_):
                if logs and "loss" in logs:
                    clock.losses.append(float(logs["loss"]))

        return Clock()

    def result(self) -> dict[str, float]:
        assert self.start is not None and self.end is not None, "fewer steps ran than the warm-up"
        seconds, tokens = self.end[0] - self.start[0], self.end[1] - self.start[1]
        return {"timed_seconds": round(seconds, 3), "timed_real_tokens": tokens,
                "real_tokens_per_s": round(tokens / seconds, 1)}


def final_loss(losses: list[float]) -> float:
    """Mean training loss of the last five steps: one batch's loss swings with its rows' lengths."""
    tail = losses[-5:]
    return round(sum(tail) / len(tail), 4)


# ---------------------------------------------------------------------------------------------------------
# The four variants. Each returns its row of the results table.


def run_trl(variant: str, paths: dict[str, str], settings: Settings, out_dir: Path) -> dict[str, Any]:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tuned = variant == "tuned_trl"
    if tuned:
        # The best a knowledgeable user picks for a small model on this CPU: one thread per process (two are
        # faster only while nothing else runs; see the thread study), no recomputation, rows of similar length
        # batched together; bf16 autocast only where the CPU has native bf16 (AVX512-BF16 / AMX): faster than
        # fp32 there, far slower where it is emulated.
        torch.set_num_threads(settings.num_threads or 1)
    bf16 = cpu_has_native_bf16() if tuned else None
    clock = StepClock(settings.warmup)

    tokenizer = AutoTokenizer.from_pretrained(paths["model"])
    attention = {"attn_implementation": settings.attn_implementation} if settings.attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(paths["model"], dtype=torch.float32, **attention)
    config_kwargs: dict[str, Any] = {
        "output_dir": str(out_dir),
        "max_steps": settings.steps,
        "per_device_train_batch_size": settings.batch_size,
        "learning_rate": LEARNING_RATE,
        "seed": SEED,
        "data_seed": SEED,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "disable_tqdm": True,
        # Measurement only: counts attention-mask tokens, i.e. the real ones.
        "include_num_input_tokens_seen": "non_padding",
        "use_cpu": True,
    }
    if tuned:
        config_kwargs.update(bf16=bf16, activation_checkpointing=False, train_sampling_strategy="group_by_length")
    config = SFTConfig(**config_kwargs)
    trainer = SFTTrainer(model=model, args=config, processing_class=tokenizer,
                         train_dataset=datasets.load_dataset("json", data_files=paths["train"], split="train"),
                         callbacks=[clock.callback()])
    trainer.train()
    row = {
        **clock.result(),
        "final_loss": final_loss(clock.losses),
        "eval_loss": round(eval_loss(trainer.model, tokenizer, paths["eval"]), 4),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "num_threads": torch.get_num_threads(),
        "dtype": "fp32+bf16-autocast" if config.bf16 else "fp32",
        "gradient_checkpointing": bool(config.activation_checkpointing),
        "sampling": config.train_sampling_strategy,
        "attn_implementation": model.config._attn_implementation,
    }
    return row


def run_plain_loop(paths: dict[str, str], settings: Settings) -> dict[str, Any]:
    """The practical limit: no Trainer, no padding (each row is its own forward/backward), same optimiser."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    bf16 = cpu_has_native_bf16()
    tokenizer = AutoTokenizer.from_pretrained(paths["model"])
    model = AutoModelForCausalLM.from_pretrained(paths["model"], dtype=torch.float32)
    model.config.use_cache = False
    model.train()
    rows = tokenize_rows(tokenizer, paths["train"])
    order = list(range(len(rows)))
    random.Random(SEED).shuffle(order)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / settings.steps))
    clock = StepClock(settings.warmup)
    seen = 0
    for step in range(settings.steps):
        start = (step * settings.batch_size) % len(order)
        batch = [rows[order[(start + i) % len(order)]] for i in range(settings.batch_size)]
        # Token-mean loss over the whole batch, as the trainers compute it: each row's summed loss is divided
        # by the batch's label count, so accumulating per-row gradients gives the batch gradient exactly.
        label_count = sum(len(ids) - 1 for ids in batch)
        batch_loss = 0.0
        for ids in batch:
            tensor = torch.tensor([ids])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(input_ids=tensor).logits
            loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), tensor[0, 1:], reduction="sum")
            (loss / label_count).backward()
            batch_loss += loss.item() / label_count
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        seen += sum(len(ids) for ids in batch)
        clock.losses.append(batch_loss)
        clock.step_done(step + 1, seen)
    return {
        **clock.result(),
        "final_loss": final_loss(clock.losses),
        "eval_loss": round(eval_loss(model, tokenizer, paths["eval"]), 4),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "num_threads": torch.get_num_threads(),
        "dtype": "fp32+bf16-autocast" if bf16 else "fp32",
        "gradient_checkpointing": False,
        "sampling": "random, one row per forward (no padding)",
        "attn_implementation": model.config._attn_implementation,
    }


def run_posttrain(paths: dict[str, str], settings: Settings, out_dir: Path) -> dict[str, Any]:
    """``posttrain train`` with its defaults, full fine-tune (peft.type=none), through the worker."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.spec import spec_from_dict
    from posttrain.worker import run_worker

    spec = spec_from_dict({
        "name": "bench",
        "model": {"name_or_path": paths["model"], "dtype": settings.model_dtype},
        "data": {"source": paths["train"]},
        "peft": {"type": settings.peft},
        "training": {"max_steps": -1 if settings.epochs else settings.steps, "num_train_epochs": settings.epochs or 1,
                     "per_device_train_batch_size": settings.batch_size, "tokens_per_batch": settings.tokens_per_batch,
                     "learning_rate": LEARNING_RATE, "seed": SEED, "num_threads": settings.num_threads,
                     **({"max_seq_length": settings.max_seq_length} if settings.max_seq_length else {})},
    })
    clock = StepClock(settings.warmup)
    result = run_worker(spec, out_dir, log_to_file=False, extra_callbacks=[clock.callback()])
    if result.state != "succeeded":
        raise RuntimeError(f"posttrain run {result.state}: {result.error}")
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    last = [rec for rec in records if "loss" in rec][-1]
    final = out_dir / "final"
    tokenizer = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    return {
        **clock.result(),
        "final_loss": final_loss(clock.losses),
        "eval_loss": round(eval_loss(model, tokenizer, paths["eval"]), 4),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        # What posttrain chose by itself, as its metrics.jsonl records it.
        "num_threads": last.get("num_threads"),
        "dtype": "fp32+bf16-autocast" if last.get("autocast") == "bf16"
        else {"float32": "fp32", "bfloat16": "bf16"}.get(last.get("dtype"), last.get("dtype")),
        "gradient_checkpointing": last.get("gradient_checkpointing"),
        "sampling": "group_by_length" if last.get("group_by_length") else "random",
        "padding_free": last.get("padding_free"),
        "attn_implementation": last.get("attn_implementation"),
        "steps": result.step,
        "tokens_per_batch": last.get("tokens_per_batch"),
    }


def cpu_has_native_bf16() -> bool:
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def run_variant(variant: str, paths: dict[str, str], settings: Settings, out_dir: Path) -> dict[str, Any]:
    if variant in ("stock_trl", "tuned_trl"):
        return run_trl(variant, paths, settings, out_dir)
    if variant == "plain_loop":
        return run_plain_loop(paths, settings)
    return run_posttrain(paths, settings, out_dir)


# ---------------------------------------------------------------------------------------------------------
# Parent: run each variant in its own process and write the table.


def machine_info() -> dict[str, Any]:
    import torch

    flags = ""
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    model_name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                       if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    return {
        "cpu": model_name,
        "cpu_count": os.cpu_count(),
        "avx2": " avx2" in flags,
        "avx512_bf16": " avx512_bf16" in flags,
        "amx_bf16": " amx_bf16" in flags,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "trl": _version("trl"),
        "platform": platform.platform(),
    }


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def spawn(variant: str, paths: dict[str, str], settings: Settings | dict[str, Any], work: Path,
          competing: bool = False, tag: str | None = None) -> dict[str, Any]:
    """Run one variant in a fresh interpreter; with ``competing``, next to a process that keeps a core busy."""
    tag = (tag or variant).replace(":", "_")
    result_file = work / f"{tag}.result.json"
    settings_json = json.dumps(settings if isinstance(settings, dict) else asdict(settings))
    command = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--tag", tag, "--work", str(work),
               "--settings", settings_json, "--paths", json.dumps(paths)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO_ROOT)}
    competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if competing else None
    started = time.perf_counter()
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    if proc.returncode != 0 or not result_file.exists():
        raise RuntimeError(f"{tag} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    row = json.loads(result_file.read_text())
    row["process_seconds"] = round(time.perf_counter() - started, 1)
    return row


def thread_and_dtype_study(paths: dict[str, str], settings: Settings, work: Path) -> dict[str, Any]:
    """posttrain's throughput with 1 and 2 threads, alone and beside a busy process; tuned TRL with 2
    threads and with eager attention; posttrain in fp32 (model.dtype=fp32) instead of its automatic bf16
    autocast."""
    short = Settings(**{**asdict(settings), "steps": STUDY_STEPS, "warmup": STUDY_WARMUP})
    rows: dict[str, Any] = {}
    for threads in (1, 2):
        for competing in (False, True):
            tag = f"posttrain_{threads}_thread{'s' if threads > 1 else ''}{'_competing' if competing else '_alone'}"
            print(f"running {tag} ...", file=sys.stderr, flush=True)
            row = spawn("posttrain", paths, Settings(**{**asdict(short), "num_threads": threads}), work,
                        competing=competing, tag=tag)
            rows[tag] = {key: row[key] for key in ("real_tokens_per_s", "num_threads", "dtype")}
    print("running tuned_trl_2_threads_alone ...", file=sys.stderr, flush=True)
    row = spawn("tuned_trl", paths, Settings(**{**asdict(short), "num_threads": 2}), work,
                tag="tuned_trl_2_threads_alone")
    rows["tuned_trl_2_threads_alone"] = {key: row[key] for key in ("real_tokens_per_s", "num_threads", "dtype")}
    print("running tuned_trl_eager_attention ...", file=sys.stderr, flush=True)
    row = spawn("tuned_trl", paths, Settings(**{**asdict(short), "attn_implementation": "eager"}), work,
                tag="tuned_trl_eager_attention")
    rows["tuned_trl_eager_attention_1_thread_alone"] = {
        key: row[key] for key in ("real_tokens_per_s", "num_threads", "dtype")}
    print("running posttrain_fp32 ...", file=sys.stderr, flush=True)
    row = spawn("posttrain", paths, Settings(**{**asdict(short), "model_dtype": "fp32"}), work, tag="posttrain_fp32")
    rows["posttrain_fp32_1_thread_alone"] = {key: row[key] for key in ("real_tokens_per_s", "num_threads", "dtype")}
    return {"steps": STUDY_STEPS, "warmup": STUDY_WARMUP, "runs": rows}


def ratio(results: dict[str, dict[str, Any]], a: str, b: str) -> float | None:
    if a in results and b in results:
        return round(results[a]["real_tokens_per_s"] / results[b]["real_tokens_per_s"], 3)
    return None


def print_table(report: dict[str, Any]) -> None:
    header = f"{'variant':<11} {'real tok/s':>10} {'final loss':>10} {'eval loss':>9} {'peak RSS MB':>11} " \
             f"{'threads':>7}  dtype"
    print(header)
    for name, row in report["results"].items():
        print(f"{name:<11} {row['real_tokens_per_s']:>10.0f} {row['final_loss']:>10.3f} {row['eval_loss']:>9.3f} "
              f"{row['peak_rss_mb']:>11.0f} {row['num_threads']!s:>7}  {row['dtype']}")
    for key, value in report["ratios"].items():
        print(f"{key}: {value}")
    for key, row in report.get("thread_and_dtype_study", {}).get("runs", {}).items():
        print(f"{key}: {row['real_tokens_per_s']:.0f} real tok/s ({row['dtype']})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: a few short steps of each variant")
    parser.add_argument("--suite", choices=("synthetic", "real", "all", "token-budget"), default="all",
                        help="synthetic: random-init hidden-256 model (results); real: SmolLM2-135M (real_model); "
                        "all: both (default); token-budget: fixed against token-budget batches (token_budget). "
                        "A run keeps the other suites' results already in the output file.")
    parser.add_argument("--repeats", type=int, default=2, help="token-budget suite: alternating runs of each arm")
    parser.add_argument("--real-methods", default="lora,full,dpo,reward,grpo,rollout",
                        help="real-model suite: comma-separated subset of lora, full, dpo, reward, grpo, rollout")
    parser.add_argument("--real-repeats", type=int, help="real-model suite: interleaved runs of each variant "
                        "(default 3; quick 1)")
    parser.add_argument("--steps", type=int, help="optimizer steps per variant (default 40; quick 3)")
    parser.add_argument("--warmup", type=int, help="steps excluded from timing (default 4; quick 1)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset to run")
    parser.add_argument("--output", type=Path, help=f"results JSON (default {DEFAULT_OUTPUT.relative_to(REPO_ROOT)})")
    parser.add_argument("--no-study", action="store_true", help="skip the thread/dtype study (on by default, "
                        "off with --quick)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--tag", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        tag = args.tag or args.child
        if args.child.startswith("real:"):
            from bench.real_model import RealSettings, run_real_child

            row = run_real_child(args.child, json.loads(args.paths), RealSettings(**json.loads(args.settings)),
                                 args.work / tag)
        else:
            row = run_variant(args.child, json.loads(args.paths), Settings(**json.loads(args.settings)),
                              args.work / tag)
        (args.work / f"{tag}.result.json").write_text(json.dumps(row))
        return 0

    settings = Settings.quick() if args.quick else Settings()
    if args.steps:
        settings.steps = args.steps
    if args.warmup is not None:
        settings.warmup = args.warmup
    if settings.warmup >= settings.steps:
        parser.error("--warmup must be smaller than --steps")
    variants = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    output = args.output or DEFAULT_OUTPUT
    # A run of one suite keeps the other suite's numbers already in the file.
    report: dict[str, Any] = json.loads(output.read_text()) if output.exists() else {}
    with tempfile.TemporaryDirectory(prefix="sft-bench-") as tmp:
        work = Path(tmp)
        # A token-budget run keeps the machine record of the other suites' numbers.
        report["machine_token_budget" if args.suite == "token-budget" else "machine"] = machine_info()
        if args.suite in ("synthetic", "all"):
            section, paths = synthetic_suite(work, settings, variants, quick=args.quick)
            report.update(section)
            report.pop("thread_and_dtype_study", None)
            if not (args.quick or args.no_study):
                report["thread_and_dtype_study"] = thread_and_dtype_study(paths, settings, work)
        if args.suite == "token-budget":
            budget_settings = Settings.quick() if args.quick else Settings(train_rows=400)
            report["token_budget"] = token_budget_suite(work, budget_settings, 1 if args.quick else args.repeats)
            report["token_budget"]["quick"] = args.quick
        if args.suite in ("real", "all"):
            from bench.real_model import RealSettings, print_real_table, run_real_suite

            real_settings = RealSettings.quick() if args.quick else RealSettings()
            if args.real_repeats:
                real_settings.repeats = args.real_repeats
            (work / "real").mkdir()
            methods = tuple(name.strip() for name in args.real_methods.split(",") if name.strip())
            report["machine_real_model"] = machine_info()
            report["real_model"] = run_real_suite(work / "real", real_settings, spawn, methods)
            report["real_model"]["quick"] = args.quick
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    if args.suite in ("synthetic", "all"):
        print_table(report)
    if args.suite in ("real", "all"):
        print_real_table(report["real_model"])
    if args.suite == "token-budget":
        print_budget_table(report["token_budget"])
    print(f"wrote {output}")
    return 0


def epoch_padding(lengths: list[int], batch_size: int, tokens_per_batch: int) -> dict[str, Any]:
    """Padding fraction and batch count of one epoch over ``lengths``: random fixed-size batches, posttrain's
    default (fixed-size, length-grouped: transformers' LengthGroupedSampler) and token-budget batches."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from posttrain.token_batches import TokenBudgetBatchSampler, padding_fraction

    def chunks(order: list[int]) -> list[list[int]]:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]

    generator = torch.Generator().manual_seed(SEED)
    plans = {
        "fixed_random": chunks(torch.randperm(len(lengths), generator=generator).tolist()),
        "fixed_length_grouped": chunks(list(LengthGroupedSampler(batch_size, lengths=lengths, generator=generator))),
        "token_budget": list(TokenBudgetBatchSampler(lengths, tokens_per_batch, seed=SEED)),
    }
    return {name: {"padding_fraction": round(padding_fraction(batches, lengths), 4), "batches": len(batches),
                   "max_padded_tokens": max(len(b) * max(lengths[i] for i in b) for b in batches)}
            for name, batches in plans.items()}


def token_budget_suite(work: Path, settings: Settings, repeats: int) -> dict[str, Any]:
    """posttrain with fixed-size batches (its default: length-grouped) against token-budget batches, one
    epoch over the same rows each. The budget is the fixed batch's worst case (batch_size x max_tokens), so
    both have the same peak batch size in tokens; runs alternate so machine load hits both alike."""
    from transformers import AutoTokenizer

    paths = prepare(work, settings)
    lengths = [len(ids) for ids in tokenize_rows(AutoTokenizer.from_pretrained(paths["model"]), paths["train"])]
    budget = settings.batch_size * settings.max_tokens
    # Rows are at most max_tokens long: nothing is truncated, and a budget of batch_size rows fits.
    shared = {**asdict(settings), "epochs": 1.0, "max_seq_length": settings.max_tokens}
    arms = {"fixed": Settings(**shared), "token_budget": Settings(**{**shared, "tokens_per_batch": budget})}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in arms}
    for repeat in range(repeats):
        for name, arm in arms.items():
            print(f"running token-budget suite: {name} ({repeat + 1}/{repeats}) ...", file=sys.stderr, flush=True)
            runs[name].append(spawn("posttrain", paths, arm, work, tag=f"budget_{name}_{repeat}"))
    best = {name: max(rows, key=lambda row: row["real_tokens_per_s"]) for name, rows in runs.items()}
    keep = ("real_tokens_per_s", "timed_seconds", "steps", "final_loss", "eval_loss", "peak_rss_mb", "num_threads",
            "dtype", "tokens_per_batch")
    return {
        "results": {name: {key: row.get(key) for key in keep} for name, row in best.items()},
        "real_tokens_per_s_runs": {name: [row["real_tokens_per_s"] for row in rows] for name, rows in runs.items()},
        "token_budget_over_fixed": round(best["token_budget"]["real_tokens_per_s"]
                                         / best["fixed"]["real_tokens_per_s"], 3),
        "epoch_padding": epoch_padding(lengths, settings.batch_size, budget),
        "settings": {**shared, "tokens_per_batch": budget, "repeats": repeats,
                     "learning_rate": LEARNING_RATE, "seed": SEED, "peft": settings.peft},
    }


def print_budget_table(section: dict[str, Any]) -> None:
    print(f"{'batches':<13} {'real tok/s':>10} {'steps':>5} {'final loss':>10} {'eval loss':>9} {'padding':>7}")
    padding = section["epoch_padding"]
    for name, row in section["results"].items():
        share = padding["token_budget" if name == "token_budget" else "fixed_length_grouped"]["padding_fraction"]
        print(f"{name:<13} {row['real_tokens_per_s']:>10.0f} {row['steps']:>5} {row['final_loss']:>10.3f} "
              f"{row['eval_loss']:>9.3f} {share:>7.1%}")
    print(f"token_budget_over_fixed: {section['token_budget_over_fixed']}")


def synthetic_suite(work: Path, settings: Settings, variants: list[str],
                    quick: bool) -> tuple[dict[str, Any], dict[str, str]]:
    paths = prepare(work, settings)
    results = {}
    for variant in variants:
        print(f"running {variant} ...", file=sys.stderr, flush=True)
        results[variant] = spawn(variant, paths, settings, work)
    section = {
        "results": results,
        "ratios": {
            "posttrain_over_plain_loop": ratio(results, "posttrain", "plain_loop"),
            "posttrain_over_tuned_trl": ratio(results, "posttrain", "tuned_trl"),
            "posttrain_over_stock_trl": ratio(results, "posttrain", "stock_trl"),
        },
        "settings": {**asdict(settings), "learning_rate": LEARNING_RATE, "seed": SEED, "eval_rows": EVAL_ROWS,
                     "peft": "none (full fine-tune)", "quick": quick},
    }
    return section, paths


if __name__ == "__main__":
    sys.exit(main())
