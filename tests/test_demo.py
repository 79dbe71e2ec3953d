"""`posttrain demo`'s stages and held-out measures (the whole demo runs in tests/test_cli.py)."""

from __future__ import annotations

import json
import re

import pytest

from posttrain.demo import (
    CONCISE_PROBE,
    MATH_PROBE,
    PROBES,
    PROBLEM_INSTRUCTION,
    SIGN_OFF,
    STYLE_PROBE,
    answer_probes,
    correct_final_line,
    first_last,
    real_model_stages,
    signed_off,
    stage_spec,
    tiny_model_stages,
    word_count,
)
from posttrain.spec import spec_from_dict
from posttrain.tiny import sample_path


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in sample_path(name).read_text(encoding="utf-8").splitlines()]


def test_each_measure_scores_what_its_stage_teaches():
    assert signed_off(f"The capital of Peru is Lima.\n\n{SIGN_OFF}") == 1.0
    assert signed_off("The capital of Peru is Lima.") == 0.0
    assert word_count(f"Ice floats.\n\n{SIGN_OFF}") == 2.0
    assert correct_final_line("6 + 9 = 15 stamps.\n#### 15\n\n— Posty", "15") == 1.0
    assert correct_final_line("6 + 9 = 15 stamps.\n#### 16", "15") == 0.0
    assert correct_final_line("6 + 9 = 15 stamps.", "15") == 0.0  # right number, but not the asked-for line
    assert STYLE_PROBE.measure([SIGN_OFF] * 4 + ["no"] * 4) == 0.5
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


def test_held_out_questions_appear_in_no_training_file():
    trained = " ".join(json.dumps(row) for name in ("style", "concise", "problems") for row in rows(name))
    for probe in PROBES:
        for question, _ in probe.questions:
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


def test_probes_answer_greedily_one_batch_per_probe(tiny_model_dir):
    answers = answer_probes(str(tiny_model_dir), (STYLE_PROBE, MATH_PROBE))
    assert set(answers) == {STYLE_PROBE.label, MATH_PROBE.label}
    assert len(answers[MATH_PROBE.label]) == len(MATH_PROBE.questions)
    assert answers == answer_probes("posttrain:tiny", (STYLE_PROBE, MATH_PROBE))  # greedy: reproducible
