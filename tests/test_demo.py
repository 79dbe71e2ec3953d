"""`posttrain demo`'s stages and held-out measures (the whole demo runs in tests/test_cli.py)."""

from __future__ import annotations

import json
import re

import pytest

from posttrain.demo import (
    CONCISE_PROBE,
    FACTS_LABEL,
    MATH_PROBE,
    PROBES,
    PROBLEM_INSTRUCTION,
    SIGN_OFF,
    STYLE_PROBE,
    Probe,
    first_last,
    measure_model,
    real_model_stages,
    stage_spec,
    tiny_model_stages,
)
from posttrain.spec import spec_from_dict
from posttrain.tiny import sample_path


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in sample_path(name).read_text(encoding="utf-8").splitlines()]


def score(probe: Probe, answer: str, reference: str | None = None) -> float:
    """The probe's grader (posttrain.graders, as a job's eval.graders) on one answer."""
    from pydantic import TypeAdapter

    from posttrain.eval.answers import grade, scorers
    from posttrain.graders import Grader

    row = Probe(probe.label, (("q", reference),), probe.grader, probe.want, 1).rows()
    grader = TypeAdapter(Grader).validate_python(probe.grader)
    return next(iter(grade(scorers([grader]), [answer], row).values()))[0]


def test_each_measure_scores_what_its_stage_teaches():
    assert score(STYLE_PROBE, f"The capital of Peru is Lima.\n\n{SIGN_OFF}") == 1.0
    assert score(STYLE_PROBE, "The capital of Peru is Lima.") == 0.0
    assert score(CONCISE_PROBE, f"Ice floats.\n\n{SIGN_OFF}") == 2.0
    assert score(MATH_PROBE, "6 + 9 = 15 stamps.\n#### 15\n\n— Posty", "15") == 1.0
    assert score(MATH_PROBE, "6 + 9 = 15 stamps.\n#### 16", "15") == 0.0
    assert score(MATH_PROBE, "6 + 9 = 15 stamps.", "15") == 0.0  # right number, but not the asked-for line
    assert STYLE_PROBE.measure([1.0] * 4 + [0.0] * 4) == 0.5
    assert STYLE_PROBE.show(0.5) == "50%" and CONCISE_PROBE.show(17.25) == "17.2"


def test_the_bundled_demo_samples_teach_the_sign_off_brevity_and_the_answer_line():
    style = rows("style")
    assert all(row["output"].endswith(f"\n\n{SIGN_OFF}") for row in style)
    # Word problems: half of the answers end with a '#### N' line (GRPO makes it the rule).
    problems = [row["output"] for row in style if " = " in row["output"]]
    finals = [output for output in problems if re.search(r"\n#### \d+\n\n", output)]
    assert 0.3 < len(finals) / len(problems) < 0.7
    for row in rows("concise"):
        assert row["chosen"].endswith(SIGN_OFF) and row["rejected"].endswith(SIGN_OFF)
        assert len(row["chosen"].split()) * 2 < len(row["rejected"].split())
    for row in rows("problems"):
        assert row["prompt"].endswith(PROBLEM_INSTRUCTION) and row["answer"].isdigit()
    facts = rows("facts")  # the regression set: prompt/answer rows, asked of no training file
    assert len(facts) == 10 and all(set(row) == {"prompt", "answer"} for row in facts)


def test_held_out_questions_appear_in_no_training_file():
    trained = " ".join(json.dumps(row) for name in ("style", "concise", "problems") for row in rows(name))
    questions = [question for probe in PROBES for question, _ in probe.questions] + [r["prompt"] for r in rows("facts")]
    for question in questions:
        question = question.removesuffix(f" {PROBLEM_INSTRUCTION}")
        assert json.dumps(question)[1:-1] not in trained, question


@pytest.mark.parametrize("stages", [real_model_stages, tiny_model_stages])
def test_every_stage_is_an_ordinary_job_spec(tmp_path, stages):
    specs = [spec_from_dict(stage_spec(stage, "posttrain:smollm2", tmp_path)) for stage in stages()]
    assert [spec.method.name for spec in specs] == ["sft", "dpo", "grpo"]
    assert all(spec.peft.type == "lora" for spec in specs)
    assert [spec.data.source for spec in specs] == ["posttrain:style", "posttrain:concise", "posttrain:problems"]
    assert spec_from_dict(stage_spec(stages()[0], "posttrain:tiny", tmp_path, steps=3)).training.max_steps == 3


def test_first_last_averages_the_first_and_last_logged_steps():
    records = [{"step": i, "loss": float(10 - i)} for i in range(10)] + [{"train_loss": 1.0}]
    assert first_last(records, "loss") == (8.0, 3.0)
    assert first_last(records[:1], "loss") is None


def test_probes_and_facts_are_answered_greedily_through_the_eval_code(tiny_model_dir):
    measured = measure_model(str(tiny_model_dir), (STYLE_PROBE, MATH_PROBE))
    assert set(measured.answers) == {STYLE_PROBE.label, MATH_PROBE.label, FACTS_LABEL}
    assert len(measured.answers[MATH_PROBE.label]) == len(measured.scores[MATH_PROBE.label]) == len(MATH_PROBE.questions)
    assert len(measured.answers[FACTS_LABEL]) == len(rows("facts")) and measured.facts == 0  # a random model
    again = measure_model("posttrain:tiny", (STYLE_PROBE, MATH_PROBE))
    assert again.answers == measured.answers  # greedy: reproducible
