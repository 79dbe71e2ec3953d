"""`posttrain demo`: the whole pipeline on the embedded tiny model in a few minutes on a laptop CPU.

SFT (alpaca) -> merge -> DPO (preference pairs) -> merge -> GRPO (GSM8k-style prompts), each with
LoRA, then a before/after sample. Every stage is an ordinary JobSpec run by the ordinary worker.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from rich.console import Console
from rich.table import Table

from posttrain.jobdir import JobDir
from posttrain.spec import spec_from_dict

SAMPLE_PROMPT = "What is the capital of France?"


def _stage_spec(name: str, method: dict, model: str, source: str, steps: int, output: Path, **training) -> dict:
    return {
        "name": f"demo-{name}",
        "model": {"name_or_path": model},
        "method": method,
        "peft": {"type": "lora", "r": 16, "alpha": 32},
        "data": {"source": source},
        "training": {"max_steps": steps, "logging_steps": max(1, steps // 10), "save_steps": steps, **training},
        "output": {"dir": str(output / name)},
        "tracking": {"report_to": ["tensorboard"]},
    }


def _first_last(records: list[dict], key: str, window: int = 5) -> tuple[float, float] | None:
    values = [r[key] for r in records if isinstance(r.get(key), int | float)]
    if len(values) < 2:
        return None
    window = max(1, min(window, len(values) // 2))
    return sum(values[:window]) / window, sum(values[-window:]) / window


def _generate(model_dir: str, prompt: str) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.modeling import resolve_model_path

    path = resolve_model_path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=40, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def run_demo(output: Path, steps: int, console: Console) -> bool:
    from posttrain.modeling import merge_adapter
    from posttrain.worker import run_worker

    output = Path(output)
    if output.exists():
        shutil.rmtree(output)
    stages = [
        ("sft", {"name": "sft"}, "posttrain:alpaca", steps * 8, {"learning_rate": 3e-3}),
        ("dpo", {"name": "dpo", "beta": 0.1}, "posttrain:preference", steps, {"learning_rate": 5e-4}),
        # At this size '####' answers are rare, so a brevity reward gives GRPO a signal it can climb.
        ("grpo", {"name": "grpo", "num_generations": 8, "max_completion_length": 48,
                  "reward_functions": ["numeric_match", "answer_format", "length"]},
         "posttrain:gsm8k", steps, {"learning_rate": 1e-3, "per_device_train_batch_size": 16}),
    ]
    trends = Table(title="what moved", show_lines=False)
    for column in ("stage", "metric", "first steps", "last steps", "direction"):
        trends.add_column(column)
    model = "posttrain:tiny"
    ok = True
    for name, method, source, stage_steps, training in stages:
        console.rule(f"[bold]{name.upper()}[/] on {model if model.startswith('posttrain:') else Path(model).name}")
        spec = spec_from_dict(_stage_spec(name, method, model, source, stage_steps, output, **training))
        result = run_worker(spec, output / name)
        if result.state != "succeeded":
            console.print(f"[red]{name} {result.state}: {result.error}[/]")
            return False
        records = JobDir(output / name).read_metrics()
        for key, want in (("loss", "down"), ("rewards/margins", "up"), ("reward", "up")):
            if name == "grpo" and key == "loss":
                continue  # GRPO's loss is not a progress measure; its reward is
            pair = _first_last(records, key)
            if pair:
                moved = pair[1] < pair[0] if want == "down" else pair[1] > pair[0]
                ok = ok and (moved or key == "reward")
                trends.add_row(name, key, f"{pair[0]:.3f}", f"{pair[1]:.3f}",
                               f"[green]{want}[/]" if moved else f"[yellow]not {want}[/]")
        merged = output / f"{name}-merged"
        merge_adapter(result.final_dir, merged)
        model = str(merged)
    console.print(trends)
    samples = Table(title="before / after", show_lines=True)
    samples.add_column("model")
    samples.add_column(f"answer to: {SAMPLE_PROMPT!r}")
    samples.add_row("tiny (random init)", _generate("posttrain:tiny", SAMPLE_PROMPT))
    samples.add_row("after SFT", _generate(str(output / "sft-merged"), SAMPLE_PROMPT))
    samples.add_row("after SFT -> DPO -> GRPO", _generate(model, SAMPLE_PROMPT))
    console.print(samples)
    console.print(f"runs in [bold]{output}[/]; plot one with: posttrain plot {output / 'sft'}")
    return ok
