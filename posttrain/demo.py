"""`posttrain demo`: SFT -> DPO -> GRPO with LoRA, each stage teaching one thing you can see.

1. SFT on ``posttrain:style`` teaches a house style: every answer ends with a last line ``— Posty``.
   Measured: the share of held-out questions whose greedy answer is signed off.
2. DPO on ``posttrain:concise`` teaches a preference: one-sentence answers over rambling ones.
   Measured: the mean length in words of greedy answers to held-out open questions.
3. GRPO on ``posttrain:problems`` teaches a checkable answer: word problems that ask for a final
   ``#### N`` line get one, with the right N, rewarded by ``numeric_match`` + ``answer_format``. Measured: the share of held-out
   problems answered that way and correctly.

Each stage is an ordinary JobSpec run by the ordinary worker, with LoRA, merged into the next stage's
base. The held-out questions appear in no training file. On the real model (``--model smollm2``) every
stage must move its own training metric and its held-out measure the expected way, else the command
exits 1. The tiny random-init model (``--model tiny``, for fast tests) learns the training rows but not
held-out questions, so there only the training metrics are checked.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from rich.table import Table

from posttrain.job.directory import JobDir
from posttrain.rewards import final_number
from posttrain.spec import SMOLLM2_MODEL_NAME, TINY_MODEL_NAME, spec_from_dict

MODEL_ALIASES = {"tiny": TINY_MODEL_NAME, "smollm2": SMOLLM2_MODEL_NAME}
# As in posttrain/assets/make_samples.py (a test checks that the bundled samples agree).
SIGN_OFF = "— Posty"
PROBLEM_INSTRUCTION = "Show your work, then give the final answer after ####."
Direction = Literal["up", "down"]


def signed_off(answer: str, _reference: str | None = None) -> float:
    """1.0 when the answer's last line is the house sign-off."""
    return 1.0 if answer.rstrip().endswith(SIGN_OFF) else 0.0


def word_count(answer: str, _reference: str | None = None) -> float:
    return float(len(answer.replace(SIGN_OFF, "").split()))


def correct_final_line(answer: str, reference: str | None = None) -> float:
    """1.0 when the answer has a ``#### N`` line and N is the reference number."""
    number = final_number(answer)
    if number is None or reference is None:
        return 0.0
    try:
        return 1.0 if abs(float(number.replace(",", "")) - float(reference)) < 1e-6 else 0.0
    except ValueError:
        return 0.0


@dataclass(frozen=True)
class Probe:
    """A held-out measure: questions answered greedily, each answer scored, the scores averaged."""

    label: str
    questions: tuple[tuple[str, str | None], ...]  # (question, reference answer or None)
    score: Callable[[str, str | None], float]
    want: Direction
    max_new_tokens: int
    percent: bool = True

    def measure(self, answers: list[str]) -> float:
        scores = [self.score(a, ref) for a, (_, ref) in zip(answers, self.questions, strict=True)]
        return sum(scores) / len(scores)

    def show(self, value: float) -> str:
        return f"{value:.0%}" if self.percent else f"{value:.1f}"


STYLE_PROBE = Probe(
    "held-out answers signed off",
    (
        ("What is the capital of Australia?", None),
        ("What is the opposite of 'loud'?", None),
        ("What color is a lemon?", None),
        ("How many legs does a spider have?", None),
        ("Who wrote Romeo and Juliet?", None),
        ("What is the largest planet in our solar system?", None),
        ("What do bees make?", None),
        ("What is 12 plus 30?", None),
    ),
    signed_off,
    "up",
    max_new_tokens=40,
)
CONCISE_PROBE = Probe(
    "words per held-out answer",
    (
        ("Explain why the sky is blue.", None),
        ("What is a good way to learn to cook?", None),
        ("How do trees grow?", None),
        ("What makes a good friend?", None),
        ("Why is it important to drink water?", None),
        ("How do computers store information?", None),
    ),
    word_count,
    "down",
    max_new_tokens=64,
    percent=False,
)
MATH_PROBE = Probe(
    "held-out problems: correct '#### N'",
    tuple((f"{question} {PROBLEM_INSTRUCTION}", answer) for question, answer in (
        ("Maya has 6 stamps. A friend gives Maya 9 more. How many stamps does Maya have now?", "15"),
        ("Omar had 24 buttons and gave away 7. How many buttons are left?", "17"),
        ("Priya buys 4 bags with 6 oranges in each bag. How many oranges does Priya buy?", "24"),
        ("Sven shares 18 balloons equally among 3 friends. How many balloons does each friend get?", "6"),
        ("Tara has 3 boxes with 7 crayons in each box. Tara uses 5 of them. How many crayons are left?", "16"),
        ("Yuki has 12 beads. A friend gives Yuki 15 more. How many beads does Yuki have now?", "27"),
        ("Noor had 30 postcards and gave away 12. How many postcards are left?", "18"),
        ("Ravi buys 5 bags with 8 lemons in each bag. How many lemons does Ravi buy?", "40"),
    )),
    correct_final_line,
    "up",
    max_new_tokens=64,
)
PROBES = (STYLE_PROBE, CONCISE_PROBE, MATH_PROBE)


@dataclass(frozen=True)
class Stage:
    """One training stage: a JobSpec's method, data and schedule, the training metric that must move,
    and the held-out probe that shows what it taught."""

    name: str
    method: dict[str, Any]
    source: str
    steps: int
    training: dict[str, Any]
    metric: tuple[str, Direction]
    probe: Probe
    peft: dict[str, Any] = field(default_factory=lambda: {"type": "lora", "r": 16, "alpha": 32})
    check_metric: bool = True  # False: the metric is shown, but not moving is no failure


def real_model_stages() -> list[Stage]:
    """Measured on SmolLM2-135M-Instruct, 1 CPU thread: see README "Demo"."""
    return [
        Stage("sft", {"name": "sft"}, "posttrain:style", 20,
              {"learning_rate": 1e-3, "per_device_train_batch_size": 8, "max_seq_length": 128},
              ("loss", "down"), STYLE_PROBE),
        Stage("dpo", {"name": "dpo", "beta": 0.1}, "posttrain:concise", 6,
              {"learning_rate": 5e-4, "per_device_train_batch_size": 4, "max_seq_length": 192},
              ("rewards/margins", "up"), CONCISE_PROBE),
        Stage("grpo", {"name": "grpo", "num_generations": 4, "max_completion_length": 64, "temperature": 1.0,
                       "reward_functions": ["numeric_match", "answer_format"]},
              "posttrain:problems", 12,
              {"learning_rate": 5e-4, "per_device_train_batch_size": 8},
              ("reward", "up"), MATH_PROBE),
    ]


def tiny_model_stages() -> list[Stage]:
    """The same stages on the 170K-parameter random-init model: more steps, higher learning rates."""
    return [
        Stage("sft", {"name": "sft"}, "posttrain:style", 480, {"learning_rate": 3e-3}, ("loss", "down"), STYLE_PROBE),
        Stage("dpo", {"name": "dpo", "beta": 0.1}, "posttrain:concise", 60, {"learning_rate": 5e-4},
              ("rewards/margins", "up"), CONCISE_PROBE),
        Stage("grpo", {"name": "grpo", "num_generations": 8, "max_completion_length": 48,
                       "reward_functions": ["numeric_match", "answer_format", "length"]},
              "posttrain:problems", 60, {"learning_rate": 1e-3, "per_device_train_batch_size": 16},
              # At this size '#### N' answers are rare: the reward is shown, not checked.
              ("reward", "up"), MATH_PROBE, check_metric=False),
    ]


def stage_spec(stage: Stage, model: str, output: Path, steps: int | None = None) -> dict[str, Any]:
    steps = steps or stage.steps
    return {
        "name": f"demo-{stage.name}",
        "model": {"name_or_path": model},
        "method": stage.method,
        "peft": stage.peft,
        "data": {"source": stage.source},
        "training": {"max_steps": steps, "logging_steps": 1, "save_steps": steps, **stage.training},
        "output": {"dir": str(output / stage.name)},
        "tracking": {"report_to": []},
    }


def first_last(records: list[dict], key: str, window: int = 5) -> tuple[float, float] | None:
    """Mean of ``key`` over the first and over the last ``window`` logged steps."""
    values = [r[key] for r in records if isinstance(r.get(key), int | float)]
    if len(values) < 2:
        return None
    window = max(1, min(window, len(values) // 2))
    return sum(values[:window]) / window, sum(values[-window:]) / window


def moved(before: float, after: float, want: Direction) -> bool:
    return after < before if want == "down" else after > before


def answer_probes(model_dir: str, probes: tuple[Probe, ...] = PROBES) -> dict[str, list[str]]:
    """Greedy answers of a model (folder or embedded name) to every probe's questions, one batch per probe."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.modeling import resolve_model_path

    path = resolve_model_path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    answers = {}
    for probe in probes:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                               tokenize=False) for q, _ in probe.questions]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=probe.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        answers[probe.label] = [tokenizer.decode(row, skip_special_tokens=True).strip()
                                for row in out[:, batch["input_ids"].shape[1]:]]
    return answers


def resolve_demo_model(model: str) -> str:
    return MODEL_ALIASES.get(model, model)


def run_demo(output: Path, steps: int | None, console: Console, model: str = "tiny") -> bool:
    """Run the three stages into ``output``; print what moved and the answers before and after.

    Returns whether every checked measure moved the expected way.
    """
    from posttrain.modeling import apply_threads, merge_adapter
    from posttrain.worker import run_worker

    base = resolve_demo_model(model)
    strict = base != MODEL_ALIASES["tiny"]
    stages = real_model_stages() if strict else tiny_model_stages()
    output = Path(output)
    if output.exists():
        shutil.rmtree(output)
    started = time.perf_counter()
    apply_threads(None, "cpu")  # the worker sets the same per job; the probes run between jobs
    console.rule(f"[bold]held-out questions[/] on {base}")
    answers = {"base": answer_probes(base)}
    current, ok = base, True
    trends = Table(title="what moved", show_lines=False)
    for column in ("stage", "measure", "before", "after", "direction"):
        trends.add_column(column)

    def add_trend(stage: str, label: str, pair: tuple[float, float], want: Direction, checked: bool,
                  show: Callable[[float], str] = "{:.3f}".format) -> None:
        nonlocal ok
        good = moved(*pair, want)
        ok = ok and (good or not checked)
        mark = f"[green]{want}[/]" if good else f"[{'red' if checked else 'yellow'}]not {want}[/]"
        trends.add_row(stage, label, show(pair[0]), show(pair[1]), mark)

    for stage in stages:
        console.rule(f"[bold]{stage.name.upper()}[/] on {current if current.startswith('posttrain:') else Path(current).name}")
        spec = spec_from_dict(stage_spec(stage, current, output, steps))
        result = run_worker(spec, output / stage.name)
        if result.state != "succeeded":
            console.print(f"[red]{stage.name} {result.state}: {result.error}[/]")
            return False
        key, want = stage.metric
        pair = first_last(JobDir(output / stage.name).read_metrics(), key)
        if pair is None:
            console.print(f"[red]{stage.name} logged no {key!r}[/]")
            ok = False
        else:
            add_trend(stage.name, f"{key} (first/last 5 steps)", pair, want, checked=stage.check_metric)
        merged = output / f"{stage.name}-merged"
        merge_adapter(result.final_dir, merged)
        current = str(merged)
        answers[stage.name] = answer_probes(current)
        probe = stage.probe
        before = probe.measure(answers[list(answers)[-2]][probe.label])
        after = probe.measure(answers[stage.name][probe.label])
        add_trend(stage.name, probe.label, (before, after), probe.want, checked=strict, show=probe.show)
    console.print(trends)
    console.print(measures_table(answers))
    console.print(answers_table(answers))
    console.print(f"{time.perf_counter() - started:.0f} s; runs and merged models in [bold]{output}[/]; "
                  f"plot one with: posttrain plot {output / 'sft'}")
    return ok


def measures_table(answers: dict[str, dict[str, list[str]]]) -> Table:
    table = Table(title="held-out measures after each stage")
    table.add_column("measure")
    for name in answers:
        table.add_column(name if name == "base" else f"after {name.upper()}")
    for probe in PROBES:
        table.add_row(probe.label, *(probe.show(probe.measure(a[probe.label])) for a in answers.values()))
    return table


def answers_table(answers: dict[str, dict[str, list[str]]]) -> Table:
    table = Table(title="before / after (greedy answers to held-out questions)", show_lines=True)
    table.add_column("model")
    for probe in PROBES:
        table.add_column(probe.questions[0][0])
    for name, by_probe in answers.items():
        table.add_row(name if name == "base" else f"after {name.upper()}",
                      *(by_probe[probe.label][0] for probe in PROBES))
    return table
