"""Graders: OpenAI-style scoring rules that GRPO turns into reward functions.

A JobSpec names them in ``method.graders`` (GRPO); the OpenAI door puts the ``grader`` of a
reinforcement job there, and YAML or REST users can write the same objects. Each grader scores one
completion against its dataset row between 0 and 1:

- ``string_check``: ``eq`` / ``ne`` (exact), ``like`` (reference is a substring), ``ilike`` (same,
  ignoring case) of two rendered templates: 1.0 or 0.0.
- ``text_similarity`` with ``evaluation_metric: fuzzy_match``: the similarity ratio of the two texts.
- ``python``: ``source`` defines ``grade(sample, item) -> float``; it runs in the worker, so it is user
  code (a keyed server accepts it only with ``--allow-user-code``).
- ``multi``: named graders combined by an arithmetic ``calculate_output`` formula over their scores.
- ``numeric_match`` (posttrain's): 1.0 when the final number of the input (after ``####``, else its last
  number; with ``final_line``, only after ``####``) equals the reference's, else 0.0 (GSM8k-style answers).
- ``exact_match`` (posttrain's): 1.0 when input and reference are equal once surrounding whitespace is
  stripped (and case, with ``ignore_case``), else 0.0.

Templates use OpenAI's syntax: ``{{sample.output_text}}`` (the completion), ``{{sample.output_json.x}}``
(a field of the completion parsed as JSON) and ``{{item.<field>}}`` (a field of the dataset row).
Model-based graders (``score_model``, ``label_model``) need a judge model this server does not host:
they are refused with a clear error.
"""

from __future__ import annotations

import ast
import difflib
import json
import logging
import math
import operator
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from posttrain.rewards import RewardFunction, completion_text, extract_answer, final_number

log = logging.getLogger("posttrain.graders")

TEMPLATE = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
SAMPLE_FIELDS = ("output_text", "output_json")
SUPPORTED_TYPES = ("string_check", "text_similarity", "python", "multi", "numeric_match", "exact_match")
SUPPORTED_METRICS = ("fuzzy_match",)
UNSUPPORTED_TYPES = {
    "score_model": "it asks a hosted judge model for a score",
    "label_model": "it asks a hosted judge model for a label",
}
MAX_SOURCE_CHARS = 256 * 1024
# Dataset columns TRL passes to reward functions that are not fields of the row.
_TRAINER_COLUMNS = frozenset({"completion_ids", "trainer_state", "log_extra", "log_metric"})


class _Grader(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(min_length=1, max_length=128, description="The grader's name (also its reward's name).")


def check_template(text: str, where: str) -> None:
    """Every ``{{...}}`` must name ``sample.output_text``, ``sample.output_json[.path]`` or ``item.<path>``."""
    for reference in TEMPLATE.findall(text):
        head, _, rest = reference.partition(".")
        if head == "item" and rest:
            continue
        if head == "sample" and rest.partition(".")[0] in SAMPLE_FIELDS:
            continue
        raise ValueError(
            f"{where}: template {{{{{reference}}}}} is not supported; use {{{{sample.output_text}}}}, "
            "{{sample.output_json.<field>}} or {{item.<field>}}"
        )


class StringCheckGrader(_Grader):
    type: Literal["string_check"] = "string_check"
    input: str = Field(max_length=65536, description="Template of the text checked, e.g. {{sample.output_text}}.")
    reference: str = Field(max_length=65536, description="Template of the expected text, e.g. {{item.answer}}.")
    operation: Literal["eq", "ne", "like", "ilike"] = Field(
        description="eq / ne: equal or not; like: reference occurs in input; ilike: the same, ignoring case."
    )

    @model_validator(mode="after")
    def _templates(self) -> StringCheckGrader:
        check_template(self.input, "input")
        check_template(self.reference, "reference")
        return self


class TextSimilarityGrader(_Grader):
    type: Literal["text_similarity"] = "text_similarity"
    input: str = Field(max_length=65536, description="Template of the text graded.")
    reference: str = Field(max_length=65536, description="Template of the text it is compared with.")
    evaluation_metric: str = Field(description="Similarity metric; posttrain computes fuzzy_match.")
    pass_threshold: float | None = Field(None, ge=0, le=1, description="Accepted and reported; not used in training.")

    @model_validator(mode="after")
    def _supported(self) -> TextSimilarityGrader:
        if self.evaluation_metric not in SUPPORTED_METRICS:
            raise ValueError(f"evaluation_metric {self.evaluation_metric!r} is not supported by posttrain "
                             f"(supported: {', '.join(SUPPORTED_METRICS)})")
        check_template(self.input, "input")
        check_template(self.reference, "reference")
        return self


class PythonGrader(_Grader):
    type: Literal["python"] = "python"
    source: str = Field(max_length=MAX_SOURCE_CHARS, description="Python defining grade(sample, item) -> float.")
    image_tag: str | None = Field(None, description="Accepted for compatibility; the worker's own Python runs it.")


class NumericMatchGrader(_Grader):
    type: Literal["numeric_match"] = "numeric_match"
    input: str = Field("{{sample.output_text}}", max_length=65536, description="Template of the answer checked.")
    reference: str = Field("{{item.answer}}", max_length=65536, description="Template of the expected answer.")
    final_line: bool = Field(False, description="Only the number on the input's '#### N' line counts (no marker: 0).")

    @model_validator(mode="after")
    def _templates(self) -> NumericMatchGrader:
        check_template(self.input, "input")
        check_template(self.reference, "reference")
        return self


class ExactMatchGrader(_Grader):
    type: Literal["exact_match"] = "exact_match"
    input: str = Field("{{sample.output_text}}", max_length=65536, description="Template of the text checked.")
    reference: str = Field("{{item.answer}}", max_length=65536, description="Template of the expected text.")
    ignore_case: bool = Field(False, description="Compare without regard to case.")

    @model_validator(mode="after")
    def _templates(self) -> ExactMatchGrader:
        check_template(self.input, "input")
        check_template(self.reference, "reference")
        return self


class MultiGrader(_Grader):
    type: Literal["multi"] = "multi"
    graders: dict[str, Grader] = Field(description="Named graders; calculate_output refers to them by name.")
    calculate_output: str = Field(max_length=4096, description="Formula over the graders' scores, e.g. "
                                                               "'0.5 * exact + 0.5 * close'.")

    @model_validator(mode="before")
    @classmethod
    def _single_grader(cls, data: Any) -> Any:
        # OpenAI's SDK types `graders` as one grader; its API docs as a mapping of names to graders.
        if isinstance(data, dict) and isinstance(data.get("graders"), dict) and "type" in data["graders"]:
            inner = data["graders"]
            return {**data, "graders": {str(inner.get("name") or "grader"): inner}}
        return data

    @model_validator(mode="after")
    def _formula(self) -> MultiGrader:
        if not self.graders:
            raise ValueError("graders: a multi grader needs at least one grader")
        compile_formula(self.calculate_output, set(self.graders))
        return self


Grader = Annotated[StringCheckGrader | TextSimilarityGrader | PythonGrader | MultiGrader | NumericMatchGrader
                   | ExactMatchGrader, Field(discriminator="type")]
MultiGrader.model_rebuild()


def check_grader_types(data: Any, where: str = "graders") -> None:
    """Name an unsupported or unknown grader type clearly (before pydantic's generic union error)."""
    if not isinstance(data, dict):
        return
    kind = data.get("type")
    if kind in UNSUPPORTED_TYPES:
        raise ValueError(f"{where}: grader type {kind!r} is not supported by posttrain: {UNSUPPORTED_TYPES[kind]}, "
                         f"and this server hosts no judge model (supported: {', '.join(SUPPORTED_TYPES)})")
    if kind not in SUPPORTED_TYPES:
        raise ValueError(f"{where}: unknown grader type {kind!r} (supported: {', '.join(SUPPORTED_TYPES)})")
    if kind == "multi" and isinstance(data.get("graders"), dict):
        inner = data["graders"]
        children = {"": inner} if "type" in inner else inner
        for name, child in children.items():
            check_grader_types(child, f"{where}.graders{'.' + name if name else ''}")


# What a grader written by its type name alone means (``graders: [numeric_match]``, ``--grader numeric_match``):
# the output checked against ``{{item.answer}}``, the row's reference answer.
SHORTHAND_GRADERS: dict[str, dict[str, Any]] = {
    "numeric_match": {"type": "numeric_match"},
    "exact_match": {"type": "exact_match"},
    "string_check": {"type": "string_check", "input": "{{sample.output_text}}", "reference": "{{item.answer}}",
                     "operation": "ilike"},
    "text_similarity": {"type": "text_similarity", "input": "{{sample.output_text}}",
                        "reference": "{{item.answer}}", "evaluation_metric": "fuzzy_match"},
}


def expand_shorthand(value: Any, where: str = "graders") -> Any:
    """A grader given by its type name (see SHORTHAND_GRADERS) as the full object, named after its type;
    anything else unchanged."""
    if not isinstance(value, str):
        return value
    if value not in SHORTHAND_GRADERS:
        raise ValueError(f"{where}: unknown grader {value!r}; by name: {', '.join(SHORTHAND_GRADERS)} "
                         "(or give the grader object)")
    return {"name": value, **SHORTHAND_GRADERS[value]}


def runs_user_code(grader: BaseModel) -> bool:
    """Whether a grader runs code it brings (python, and multi, whose formula and children are code-like)."""
    return isinstance(grader, PythonGrader | MultiGrader)


# ---------------------------------------------------------------------------------------------------
# Templates


def _lookup(value: Any, path: list[str]) -> Any:
    for part in path:
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


def render(template: str, sample: dict[str, Any], item: dict[str, Any]) -> str:
    """Fill ``{{sample.x}}`` and ``{{item.x}}`` in; missing fields render as the empty string."""

    def fill(match: re.Match[str]) -> str:
        head, *path = match.group(1).split(".")
        return _as_text(_lookup(sample if head == "sample" else item, path))

    return TEMPLATE.sub(fill, template)


def _output_json(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None


# ---------------------------------------------------------------------------------------------------
# Scoring


def string_check(grader: StringCheckGrader, sample: dict[str, Any], item: dict[str, Any]) -> float:
    got, want = render(grader.input, sample, item), render(grader.reference, sample, item)
    if grader.operation == "eq":
        return float(got == want)
    if grader.operation == "ne":
        return float(got != want)
    if grader.operation == "like":
        return float(want in got)
    return float(want.lower() in got.lower())


def numeric_match(grader: NumericMatchGrader, sample: dict[str, Any], item: dict[str, Any]) -> float:
    text = render(grader.input, sample, item)
    if grader.final_line:
        number = final_number(text)
        got = float(number.replace(",", "")) if number is not None else None
    else:
        got = extract_answer(text)
    want = extract_answer(render(grader.reference, sample, item))
    return float(got is not None and want is not None and abs(got - want) < 1e-6)


def exact_match(grader: ExactMatchGrader, sample: dict[str, Any], item: dict[str, Any]) -> float:
    got, want = render(grader.input, sample, item).strip(), render(grader.reference, sample, item).strip()
    if grader.ignore_case:
        got, want = got.casefold(), want.casefold()
    return float(got == want)


def fuzzy_match(grader: TextSimilarityGrader, sample: dict[str, Any], item: dict[str, Any]) -> float:
    got, want = render(grader.input, sample, item), render(grader.reference, sample, item)
    return difflib.SequenceMatcher(None, got, want, autojunk=False).ratio()


_BINARY: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.Pow: operator.pow, ast.Mod: operator.mod,
}
_FUNCTIONS: dict[str, Callable[..., float]] = {
    "min": min, "max": max, "abs": abs, "floor": math.floor, "ceil": math.ceil, "sqrt": math.sqrt,
    "exp": math.exp, "log": math.log,
}


def compile_formula(formula: str, names: set[str]) -> Callable[[dict[str, float]], float]:
    """A multi grader's ``calculate_output``: numbers, grader names, + - * / ** %, and min, max, abs, floor,
    ceil, sqrt, exp, log; evaluated over its own syntax tree, never by ``eval``."""
    try:
        tree = ast.parse(formula, mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"calculate_output {formula!r} is not a formula ({exc.msg})") from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id not in names and node.id not in _FUNCTIONS:
            raise ValueError(f"calculate_output refers to {node.id!r}, which is not one of the graders "
                             f"({', '.join(sorted(names))})")
        allowed = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Name, ast.Load, ast.Call,
                   ast.USub, ast.UAdd, *_BINARY)
        if not isinstance(node, allowed) or (isinstance(node, ast.Constant) and not isinstance(node.value, int | float)):
            raise ValueError(f"calculate_output {formula!r}: {type(node).__name__} is not allowed in a formula")
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS):
            raise ValueError(f"calculate_output {formula!r}: only {', '.join(_FUNCTIONS)} may be called")

    def evaluate(node: ast.AST, scores: dict[str, float]) -> float:
        if isinstance(node, ast.Expression):
            return evaluate(node.body, scores)
        if isinstance(node, ast.Constant):
            return float(node.value)
        if isinstance(node, ast.Name):
            return scores[node.id]
        if isinstance(node, ast.UnaryOp):
            value = evaluate(node.operand, scores)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp):
            return _BINARY[type(node.op)](evaluate(node.left, scores), evaluate(node.right, scores))
        assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        return float(_FUNCTIONS[node.func.id](*(evaluate(arg, scores) for arg in node.args)))

    return lambda scores: evaluate(tree, scores)


Scorer = Callable[[dict[str, Any], dict[str, Any]], float]


def build_scorer(grader: BaseModel) -> Scorer:
    """``score(sample, item) -> float`` for a grader; a python grader's source is executed here (worker only)."""
    if isinstance(grader, StringCheckGrader):
        return lambda sample, item: string_check(grader, sample, item)
    if isinstance(grader, TextSimilarityGrader):
        return lambda sample, item: fuzzy_match(grader, sample, item)
    if isinstance(grader, NumericMatchGrader):
        return lambda sample, item: numeric_match(grader, sample, item)
    if isinstance(grader, ExactMatchGrader):
        return lambda sample, item: exact_match(grader, sample, item)
    if isinstance(grader, PythonGrader):
        namespace: dict[str, Any] = {"__name__": f"posttrain_grader_{grader.name}"}
        exec(compile(grader.source, f"<grader {grader.name}>", "exec"), namespace)  # user code, allowed by policy
        grade = namespace.get("grade")
        if not callable(grade):
            raise ValueError(f"python grader {grader.name!r} defines no grade(sample, item) function")
        return lambda sample, item: float(grade(sample, item))
    if isinstance(grader, MultiGrader):
        scorers = {name: build_scorer(child) for name, child in grader.graders.items()}
        formula = compile_formula(grader.calculate_output, set(scorers))
        return lambda sample, item: formula({name: scorer(sample, item) for name, scorer in scorers.items()})
    raise TypeError(f"not a grader: {grader!r}")


def _rows(columns: dict[str, Any], count: int) -> list[dict[str, Any]]:
    """The dataset row of each completion: the ``item`` column (a JSON object per row, as the data layer
    keeps OpenAI's reinforcement rows) or else the row's other columns."""
    items = columns.get("item")
    if isinstance(items, list) and len(items) == count:
        rows = []
        for value in items:
            parsed = json.loads(value) if isinstance(value, str) else value
            rows.append(parsed if isinstance(parsed, dict) else {})
        return rows
    fields = {key: values for key, values in columns.items()
              if key not in _TRAINER_COLUMNS and isinstance(values, list) and len(values) == count}
    return [{key: values[index] for key, values in fields.items()} for index in range(count)]


def text_scorer(grader: BaseModel) -> Callable[[list[str], list[dict[str, Any]]], list[float]]:
    """``score(texts, items) -> scores`` for a grader: each text is ``{{sample.output_text}}`` (and parsed,
    ``output_json``), its item the row. A sample the grader fails on scores 0, the reason logged once."""
    scorer = build_scorer(grader)
    name = getattr(grader, "name", "grader")
    wants_json = "sample.output_json" in json.dumps(grader.model_dump())
    warned = False

    def score(texts: list[str], items: list[dict[str, Any]]) -> list[float]:
        nonlocal warned
        scores: list[float] = []
        for text, item in zip(texts, items, strict=True):
            sample = {"output_text": text, "output_json": _output_json(text) if wants_json else None}
            try:
                scores.append(scorer(sample, item))
            except Exception as exc:  # one failing sample scores 0; the reason is logged once per grader
                if not warned:
                    log.warning("grader %s failed on a sample (scored 0): %s: %s", name, type(exc).__name__, exc)
                    warned = True
                scores.append(0.0)
        return scores

    return score


def grader_reward(grader: BaseModel) -> RewardFunction:
    """A TRL reward function (``f(prompts, completions, **columns)``) scoring with ``grader``."""
    score = text_scorer(grader)

    def reward(prompts: list[Any], completions: list[Any], **columns: Any) -> list[float | None]:
        return list(score([completion_text(c) for c in completions], _rows(columns, len(completions))))

    reward.__name__ = re.sub(r"\W", "_", getattr(grader, "name", "grader"))
    return reward


def grader_rewards(graders: list[Any]) -> list[RewardFunction]:
    return [grader_reward(grader) for grader in graders]
