"""`posttrain demo`: SFT -> DPO -> GRPO with LoRA, each stage teaching one thing you can see.

1. SFT on ``posttrain:style`` teaches a house style: every answer ends with a last line ``— Posty``.
   Measured: the share of held-out questions whose greedy answer is signed off.
2. DPO on ``posttrain:concise`` teaches a preference: one-sentence answers over rambling ones.
   Measured: the mean length in words of greedy answers to held-out open questions.
3. GRPO on ``posttrain:problems`` teaches a checkable answer: word problems that ask for a final
   ``#### N`` line get one, with the right N, rewarded by ``final_line_match`` + ``answer_format`` +
   ``repetition`` + ``numeric_match``. Measured: the share of 16 held-out problems answered that way and
   correctly.

After every stage the demo also asks the facts of ``posttrain:facts`` (a regression set the base model
answers right) and counts how many still come out right. Every measure is computed by the evaluation code
(:mod:`posttrain.eval`): greedy answers from the inference engine, scored by graders.

Each stage is an ordinary JobSpec run by the ordinary worker, with LoRA, merged into the next stage's
base. The held-out questions appear in no training file. On the real model (``--model smollm2``) every
stage must move its own training metric and its held-out measure the expected way, and keep the facts (at
most ``FACTS_SLACK`` of the base's lost), else the command exits 1. The tiny random-init model (``--model
tiny``, for fast tests) learns the training rows but not held-out questions, so there only the training
metrics are checked.
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

from posttrain.data.eval_rows import EvalRow, eval_row
from posttrain.job.directory import JobDir
from posttrain.spec import SMOLLM2_MODEL_NAME, TINY_MODEL_NAME, spec_from_dict

MODEL_ALIASES = {"tiny": TINY_MODEL_NAME, "smollm2": SMOLLM2_MODEL_NAME}
# As in posttrain/assets/make_samples.py (a test checks that the bundled samples agree).
SIGN_OFF = "— Posty"
PROBLEM_INSTRUCTION = "Show your work, then give the final answer after ####."
Direction = Literal["up", "down"]
# Facts the model may have lost, against the base, after any stage before the demo counts it as forgetting.
# Greedy answers of a 135M model to ten questions: every fine-tune tried flips one or two (SFT turns Canberra
# into Sydney in every variant tried: LoRA r4 or r16, lr 3e-4 to 1e-3, 10 or 20 steps, without templated
# capitals; attention-only LoRA kept it, but then GRPO did not learn the '#### N' line).
FACTS_SLACK = 2
DEFAULT_SEED = 42  # training.seed of every stage (data order, sampling, initialisation): --seed


@dataclass(frozen=True)
class Probe:
    """A held-out measure: questions answered greedily (through the inference engine, as ``posttrain eval``
    does), each answer scored by ``grader`` (a posttrain grader), the scores averaged."""

    label: str
    questions: tuple[tuple[str, str | None], ...]  # (question, reference answer or None)
    grader: dict[str, Any]
    want: Direction
    max_new_tokens: int
    percent: bool = True

    def rows(self) -> list[EvalRow]:
        return [eval_row({"prompt": [{"role": "user", "content": q}], "answer": a or ""}) for q, a in self.questions]

    def measure(self, scores: list[float]) -> float:
        return sum(scores) / len(scores)

    def show(self, value: float) -> str:
        return f"{value:.0%}" if self.percent else f"{value:.1f}"


# The scores, as graders (posttrain.graders): the same objects a job's eval.graders takes.
SIGNED_OFF = {"type": "string_check", "name": "signed_off", "input": "{{sample.output_text}}", "reference": SIGN_OFF,
              "operation": "like"}
WORDS = {"type": "python", "name": "words",
         "source": f"def grade(sample, item):\n    return float(len(sample['output_text'].replace({SIGN_OFF!r}, '').split()))\n"}
CORRECT_FINAL_LINE = {"type": "numeric_match", "name": "correct_final_line", "final_line": True}

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
    SIGNED_OFF,
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
    WORDS,
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
        ("Lena has 14 marbles. A friend gives Lena 8 more. How many marbles does Lena have now?", "22"),
        ("Hugo had 40 stickers and gave away 15. How many stickers are left?", "25"),
        ("Ines buys 3 bags with 9 plums in each bag. How many plums does Ines buy?", "27"),
        ("Kofi shares 20 cards equally among 4 friends. How many cards does each friend get?", "5"),
        ("Mira has 4 boxes with 6 pens in each box. Mira uses 9 of them. How many pens are left?", "15"),
        ("Dev has 7 shells. A friend gives Dev 16 more. How many shells does Dev have now?", "23"),
        ("Anya had 35 coins and gave away 20. How many coins are left?", "15"),
        ("Luis buys 6 bags with 5 pears in each bag. How many pears does Luis buy?", "30"),
    )),
    CORRECT_FINAL_LINE,
    "up",
    max_new_tokens=64,
)
PROBES = (STYLE_PROBE, CONCISE_PROBE, MATH_PROBE)
# Forgetting: facts the base model states right (posttrain:facts), checked after every stage like eval.regression.
FACTS_SOURCE = "posttrain:facts"
FACTS_LABEL = "facts still stated right"
FACTS_NEW_TOKENS = 24

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


# GRPO pays for one '#### N' line with the right N (final_line_match), gives partial credit for the line's form
# (answer_format: a marker, a number after it) and for working whose final number is right (numeric_match),
# and penalises repeats (repetition). numeric_match + answer_format alone taught a column of '#### N' lines, or a
# bare '####' that never improved; without numeric_match the line's form came first and the working decayed
# (SmolLM2, seed 1: 0% held-out after 30 steps; with it, 62% after 24).
GRPO_REWARDS = {"reward_functions": ["final_line_match", "answer_format", "repetition", "numeric_match"],
                "reward_weights": [1.0, 0.5, 1.0, 0.5]}


def real_model_stages() -> list[Stage]:
    """Measured on SmolLM2-135M-Instruct, 1 CPU thread: see README "Demo"."""
    return [
        Stage("sft", {"name": "sft"}, "posttrain:style", 20,
              {"learning_rate": 1e-3, "per_device_train_batch_size": 8, "max_seq_length": 128},
              ("loss", "down"), STYLE_PROBE),
        # beta 0.3 (not TRL's 0.1): as concise, and the facts held better (SmolLM2, seed 2: 19.0 words, 8/10
        # facts, against 20.3 words, 7/10).
        Stage("dpo", {"name": "dpo", "beta": 0.3}, "posttrain:concise", 6,
              {"learning_rate": 5e-4, "per_device_train_batch_size": 4, "max_seq_length": 192},
              ("rewards/margins", "up"), CONCISE_PROBE),
        # 2 prompts x 8 completions a step (more groups whose completions differ in reward than 4 x 4), and a KL
        # penalty (beta) to the stage's starting model: without it a model that already wrote '#### N' lines
        # drifted and lost as many problems as it gained.
        Stage("grpo", {"name": "grpo", "num_generations": 8, "max_completion_length": 64, "temperature": 0.8,
                       "beta": 0.04, **GRPO_REWARDS},
              "posttrain:problems", 24,
              {"learning_rate": 3e-4, "per_device_train_batch_size": 16},
              ("reward", "up"), MATH_PROBE),
    ]


def tiny_model_stages() -> list[Stage]:
    """The same stages on the 170K-parameter random-init model: more steps, higher learning rates."""
    return [
        Stage("sft", {"name": "sft"}, "posttrain:style", 480, {"learning_rate": 3e-3}, ("loss", "down"), STYLE_PROBE),
        Stage("dpo", {"name": "dpo", "beta": 0.1}, "posttrain:concise", 60, {"learning_rate": 5e-4},
              ("rewards/margins", "up"), CONCISE_PROBE),
        Stage("grpo", {"name": "grpo", "num_generations": 8, "max_completion_length": 48, **GRPO_REWARDS},
              "posttrain:problems", 60, {"learning_rate": 1e-3, "per_device_train_batch_size": 16},
              # At this size '#### N' answers are rare: the reward is shown, not checked.
              ("reward", "up"), MATH_PROBE, check_metric=False),
    ]


def stage_spec(stage: Stage, model: str, output: Path, steps: int | None = None, seed: int = DEFAULT_SEED
               ) -> dict[str, Any]:
    steps = steps or stage.steps
    return {
        "name": f"demo-{stage.name}",
        "model": {"name_or_path": model},
        "method": stage.method,
        "peft": stage.peft,
        "data": {"source": stage.source},
        "training": {"max_steps": steps, "logging_steps": 1, "save_steps": steps, "seed": seed, **stage.training},
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


@dataclass
class Measured:
    """One model's greedy answers to every probe and to the facts, and their scores."""

    answers: dict[str, list[str]]
    scores: dict[str, list[float]]

    def value(self, probe: Probe) -> float:
        return probe.measure(self.scores[probe.label])

    @property
    def facts(self) -> float:
        return sum(self.scores[FACTS_LABEL])


def measure_model(model_dir: str, probes: tuple[Probe, ...] = PROBES) -> Measured:
    """A model's (folder or embedded name) greedy answers to each probe and to the facts, from the inference
    engine serving uses (``posttrain.eval``: one batch per probe), scored by the probes' graders."""
    from pydantic import TypeAdapter

    from posttrain.data.eval_rows import load_eval_rows
    from posttrain.eval.answers import EngineModel, grade, regression_grader, scorers
    from posttrain.eval.compare import load_target, resolve_target
    from posttrain.graders import Grader
    from posttrain.inference.engine import InferenceEngine
    from posttrain.modeling import ensure_chat_template

    model, tokenizer = load_target(resolve_target(model_dir))
    ensure_chat_template(tokenizer)
    engine = InferenceEngine(model, tokenizer, model_dir)
    answerer = EngineModel(engine)
    measured = Measured({}, {})
    facts = load_eval_rows(FACTS_SOURCE, "train").rows
    sets = [(probe.label, probe.rows(), TypeAdapter(Grader).validate_python(probe.grader), probe.max_new_tokens)
            for probe in probes]
    sets.append((FACTS_LABEL, facts, regression_grader(), FACTS_NEW_TOKENS))
    try:
        for label, rows, grader, new_tokens in sets:
            answers = [a.strip() for a in answerer.answer([row.prompt for row in rows], new_tokens, 0.0)]
            measured.answers[label] = answers
            measured.scores[label] = next(iter(grade(scorers([grader]), answers, rows).values()))
    finally:
        engine.close()
    return measured


def resolve_demo_model(model: str) -> str:
    return MODEL_ALIASES.get(model, model)


def run_demo(output: Path, steps: int | None, console: Console, model: str = "tiny", seed: int = DEFAULT_SEED) -> bool:
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
    measured = {"base": measure_model(base)}
    current, ok = base, True
    trends = Table(title="what moved", show_lines=False)
    for column in ("stage", "measure", "before", "after", "direction"):
        trends.add_column(column)

    def add_trend(stage: str, label: str, pair: tuple[float, float], want: Direction | Literal["kept"],
                  checked: bool, show: Callable[[float], str] = "{:.3f}".format) -> None:
        nonlocal ok
        # Facts are kept when no more than FACTS_SLACK of the base's are lost, whatever the stage before did.
        good = pair[1] >= measured["base"].facts - FACTS_SLACK if want == "kept" else moved(*pair, want)
        ok = ok and (good or not checked)
        mark = f"[green]{want}[/]" if good else f"[{'red' if checked else 'yellow'}]not {want}[/]"
        trends.add_row(stage, label, show(pair[0]), show(pair[1]), mark)

    for stage in stages:
        console.rule(f"[bold]{stage.name.upper()}[/] on {current if current.startswith('posttrain:') else Path(current).name}")
        spec = spec_from_dict(stage_spec(stage, current, output, steps, seed))
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
        before = measured[list(measured)[-1]]
        measured[stage.name] = after = measure_model(current)
        probe = stage.probe
        add_trend(stage.name, probe.label, (before.value(probe), after.value(probe)), probe.want, checked=strict,
                  show=probe.show)
        add_trend(stage.name, FACTS_LABEL, (before.facts, after.facts), "kept", checked=strict,
                  show="{:.0f}".format)
    console.print(trends)
    console.print(measures_table(measured))
    console.print(answers_table(measured))
    console.print(f"{time.perf_counter() - started:.0f} s; runs and merged models in [bold]{output}[/]; "
                  f"plot one with: posttrain plot {output / 'sft'}")
    return ok


def measures_table(measured: dict[str, Measured]) -> Table:
    table = Table(title="held-out measures after each stage")
    table.add_column("measure")
    for name in measured:
        table.add_column(name if name == "base" else f"after {name.upper()}")
    for probe in PROBES:
        table.add_row(probe.label, *(probe.show(m.value(probe)) for m in measured.values()))
    total = len(next(iter(measured.values())).scores[FACTS_LABEL])
    table.add_row(FACTS_LABEL, *(f"{m.facts:.0f}/{total}" for m in measured.values()))
    return table


def answers_table(measured: dict[str, Measured]) -> Table:
    table = Table(title="before / after (greedy answers to held-out questions)", show_lines=True)
    table.add_column("model")
    for probe in PROBES:
        table.add_column(probe.questions[0][0])
    for name, m in measured.items():
        table.add_row(name if name == "base" else f"after {name.upper()}",
                      *(m.answers[probe.label][0] for probe in PROBES))
    return table
