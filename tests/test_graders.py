"""Graders: OpenAI-style scoring rules turned into GRPO reward functions, and the JobSpec that carries them."""

from __future__ import annotations

import json

import pytest

from posttrain.errors import ConfigError
from posttrain.graders import grader_reward, render
from posttrain.recipes.grpo import reward_functions
from posttrain.spec import spec_from_dict


def grpo_spec(*graders: dict, **method: object):
    return spec_from_dict({"method": {"name": "grpo", "reward_functions": [], "graders": list(graders), **method}})


def grader(**fields: object):
    return grpo_spec(fields).method.graders[0]


def check(operation: str, reference: str = "{{item.answer}}"):
    return grader(type="string_check", name="check", input="{{sample.output_text}}", reference=reference,
                  operation=operation)


def score(reward, completions: list, **columns: list) -> list:
    return reward(prompts=["p"] * len(completions), completions=completions, **columns)


def test_templates_fill_sample_and_item_fields_and_render_missing_ones_empty():
    sample = {"output_text": "Paris", "output_json": {"city": "Paris", "tags": ["a", "b"]}}
    item = {"answer": "Paris", "meta": {"country": "France"}, "n": 3}
    assert render("{{ sample.output_text }} / {{item.answer}}", sample, item) == "Paris / Paris"
    assert render("{{item.meta.country}} {{item.n}} {{sample.output_json.tags.1}}", sample, item) == "France 3 b"
    assert render("[{{item.missing}}]", sample, item) == "[]"


@pytest.mark.parametrize(("operation", "expected"), [
    ("eq", [1.0, 0.0, 0.0]), ("ne", [0.0, 1.0, 1.0]), ("like", [1.0, 1.0, 0.0]), ("ilike", [1.0, 1.0, 1.0]),
])
def test_string_check_operations(operation: str, expected: list[float]):
    reward = grader_reward(check(operation))
    completions = ["Paris", "It is Paris.", "it is paris"]
    assert score(reward, completions, answer=["Paris"] * 3) == expected
    assert reward.__name__ == "check"  # TRL logs each reward under its function's name


def test_numeric_and_exact_match_graders_and_graders_by_name():
    numeric = grader_reward(grader(type="numeric_match", name="n"))  # defaults: the output vs {{item.answer}}
    completions = ["6 + 9 = 15\n#### 15", "The answer is 15.", "#### 16", "no number"]
    assert score(numeric, completions, answer=["15"] * 4) == [1.0, 1.0, 0.0, 0.0]
    # A GSM8k-style reference is read the same way: its final number.
    assert score(numeric, ["#### 72"], answer=["48 + 24 = 72\n#### 72"]) == [1.0]
    strict = grader_reward(grader(type="numeric_match", name="n", final_line=True))  # only a '#### N' line counts
    assert score(strict, completions, answer=["15"] * 4) == [1.0, 0.0, 0.0, 0.0]
    exact = grader_reward(grader(type="exact_match", name="e", ignore_case=True))
    assert score(exact, ["  paris \n", "Paris."], answer=["Paris"] * 2) == [1.0, 0.0]
    by_name = spec_from_dict({"eval": {"graders": ["numeric_match", "string_check"]}}).eval.graders
    assert [(g.name, g.type) for g in by_name] == [("numeric_match", "numeric_match"), ("string_check", "string_check")]
    assert by_name[1].operation == "ilike" and by_name[1].reference == "{{item.answer}}"
    with pytest.raises(ConfigError, match=r"eval: .*graders\[0\]: unknown grader 'bleu'"):
        spec_from_dict({"eval": {"graders": ["bleu"]}})
    with pytest.raises(ConfigError, match=r"two graders are named 'numeric_match'"):
        spec_from_dict({"eval": {"graders": ["numeric_match", "numeric_match"]}})


def test_rows_come_from_the_item_column_of_openai_reinforcement_rows():
    reward = grader_reward(check("eq", "{{item.word}}"))
    items = [json.dumps({"word": "red"}), json.dumps({"word": "blue"})]
    assert score(reward, ["red", "red"], item=items) == [1.0, 0.0]


def test_chat_completions_are_graded_on_their_text():
    reward = grader_reward(check("eq"))
    assert score(reward, [[{"role": "assistant", "content": "4"}]], answer=["4"]) == [1.0]


def test_fuzzy_match_scores_similarity_between_zero_and_one():
    reward = grader_reward(grader(type="text_similarity", name="close", input="{{sample.output_text}}",
                                  reference="{{item.answer}}", evaluation_metric="fuzzy_match"))
    exact, near, far = score(reward, ["kitten", "sitting", "zzz"], answer=["kitten"] * 3)
    assert exact == 1.0 and 0.3 < near < 1.0 and far == 0.0


def test_python_graders_run_their_grade_function_and_a_failing_sample_scores_zero():
    source = "def grade(sample, item):\n    return len(sample['output_text']) / int(item['answer'])\n"
    reward = grader_reward(grader(type="python", name="ratio", source=source))
    assert score(reward, ["ab", "abcd"], answer=["4", "0"]) == [0.5, 0.0]  # 4/0 fails: scored 0, logged


def test_multi_graders_combine_scores_with_a_formula_never_with_eval():
    children = {"exact": {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
                          "reference": "{{item.answer}}", "operation": "eq"},
                "near": {"type": "string_check", "name": "near", "input": "{{sample.output_text}}",
                         "reference": "{{item.answer}}", "operation": "ilike"}}
    multi = grader(type="multi", name="both", graders=children, calculate_output="0.75 * exact + 0.25 * max(near, 0)")
    assert score(grader_reward(multi), ["Yes", "yes!", "no"], answer=["Yes"] * 3) == [1.0, 0.25, 0.0]
    with pytest.raises(ConfigError, match="only min, max"):
        grader(type="multi", name="bad", graders=children, calculate_output="__import__('os').getcwd()")
    with pytest.raises(ConfigError, match="Attribute is not allowed in a formula"):
        grader(type="multi", name="bad", graders=children, calculate_output="exact.real")
    with pytest.raises(ConfigError, match="'other', which is not one of the graders"):
        grader(type="multi", name="bad", graders=children, calculate_output="exact + other")


@pytest.mark.parametrize(("fields", "message"), [
    ({"type": "score_model", "name": "judge", "model": "gpt-4o", "input": []}, "'score_model' is not supported"),
    ({"type": "label_model", "name": "judge"}, "'label_model' is not supported"),
    ({"type": "regex", "name": "x"}, "unknown grader type 'regex'"),
    ({"type": "text_similarity", "name": "x", "input": "a", "reference": "b", "evaluation_metric": "bleu"},
     "evaluation_metric 'bleu' is not supported"),
    ({"type": "string_check", "name": "x", "input": "{{output}}", "reference": "b", "operation": "eq"},
     "template {{output}} is not supported"),
    ({"type": "string_check", "name": "x", "input": "a", "reference": "b", "operation": "regex"}, "operation"),
])
def test_unsupported_graders_are_named_clearly(fields: dict, message: str):
    with pytest.raises(ConfigError, match=message):
        grpo_spec(fields)


def test_graders_follow_the_named_reward_functions_and_weights_count_both():
    exact = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
             "reference": "{{item.answer}}", "operation": "eq"}
    spec = spec_from_dict({"method": {"name": "grpo", "reward_functions": ["length"], "graders": [exact],
                                      "reward_weights": [0.1, 1.0]}})
    assert [f.__name__ for f in reward_functions(spec.method.reward_functions, spec.method.graders)] == ["length",
                                                                                                        "exact"]
    with pytest.raises(ConfigError, match="2 rewards"):
        spec_from_dict({"method": {"name": "grpo", "reward_functions": ["length"], "graders": [exact],
                                   "reward_weights": [1.0]}})
