"""``posttrain eval MODEL [MODEL ...] --data FILE``: models scored side by side (:mod:`posttrain.eval.compare`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from posttrain.commands.common import console, fail
from posttrain.errors import ConfigError, PosttrainError

# Answers shown per model under the table (all of them are in --json).
SHOWN_ANSWERS = 3


def parse_graders(values: list[str]) -> list[Any]:
    """``--grader`` values: a grader's name (numeric_match, exact_match, string_check, text_similarity) or a
    grader object as JSON."""
    from pydantic import TypeAdapter, ValidationError

    from posttrain.graders import Grader, check_grader_types, expand_shorthand

    graders = []
    for value in values:
        try:
            data = json.loads(value) if value.lstrip().startswith("{") else expand_shorthand(value, "--grader")
            check_grader_types(data, "--grader")
            graders.append(TypeAdapter(Grader).validate_python(data))
        except (ValueError, ValidationError) as exc:
            raise ConfigError(f"--grader {value!r}: {exc}") from None
    names = [grader.name for grader in graders]
    if len(set(names)) != len(names):
        raise ConfigError("--grader: two graders have the same name; give each grader object its own name")
    return graders


def metrics_table(reports: list[Any]) -> Table:
    table = Table(title="held-out scores", show_lines=False)
    table.add_column("metric")
    for report in reports:
        table.add_column(report.model, justify="right", overflow="fold")
    names: list[str] = []
    for report in reports:
        names += [name for name in report.metrics if name not in names]
    for name in names:
        values = [report.metrics.get(name) for report in reports]
        table.add_row(name, *("–" if value is None else f"{value:.4g}" for value in values))
    table.add_row("seconds", *(f"{report.seconds:.1f}" for report in reports))
    return table


def answers_table(reports: list[Any], count: int) -> Table | None:
    held_out = [[a for a in report.answers if a["set"] == "held_out"] for report in reports]
    if count <= 0 or not held_out or not held_out[0]:
        return None
    table = Table(title="answers (all of them: --json)", show_lines=True)
    table.add_column("prompt", overflow="fold")
    table.add_column("reference", overflow="fold")
    for report in reports:
        table.add_column(report.model, overflow="fold")
    for index in range(min(count, len(held_out[0]))):
        prompt = held_out[0][index]["prompt"]
        text = prompt[-1]["content"] if isinstance(prompt, list) else str(prompt)
        table.add_row(text, held_out[0][index]["reference"],
                      *(answers[index]["answer"] if index < len(answers) else "" for answers in held_out))
    return table


def register(app: typer.Typer) -> None:
    app.command("eval")(evaluate)


def evaluate(
    models: Annotated[list[str], typer.Argument(
        help="Models to compare: a base model (posttrain:tiny, a folder, a hub id), a job directory (its final/), "
             "a checkpoint, a LoRA adapter folder, or server:MODEL_ID (a model served at --server).",
        show_default=False)],
    data: Annotated[str, typer.Option("--data", help="Held-out rows: a file, folder, hub id or posttrain: sample, "
                                                     "in any format posttrain reads.")],
    grader: Annotated[list[str] | None, typer.Option(
        "--grader", help="A grader by name (numeric_match, exact_match, string_check, text_similarity) or as a JSON "
                         "object; repeat for several (default: text_similarity against the reference).")] = None,
    split: Annotated[str, typer.Option(help="Split of a hub or saved dataset.")] = "train",
    max_samples: Annotated[int | None, typer.Option(help="Score at most this many rows (a seeded sample).")] = None,
    regression: Annotated[str | None, typer.Option(
        help="A regression set (question/answer rows): how many each model still answers right.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens.")] = 64,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0: greedy.")] = 0.0,
    batch_size: Annotated[int, typer.Option(help="Rows generated or scored together.")] = 16,
    max_length: Annotated[int, typer.Option(help="Longest scored sequence (prompt + reply), in tokens.")] = 1024,
    seed: Annotated[int, typer.Option(help="Seed of the row sample and of sampled answers.")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda, mps, or auto.")] = "auto",
    server: Annotated[str, typer.Option(help="OpenAI-compatible server of server:MODEL_ID models.")] = (
        "http://127.0.0.1:8322"),
    api_key: Annotated[str | None, typer.Option(envvar="POSTTRAIN_API_KEY", help="Bearer key for --server.")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write every model's metrics and answers here.")] = None,
    show: Annotated[int, typer.Option("--show", help="Answers shown per model under the table.")] = SHOWN_ANSWERS,
) -> None:
    """Score models side by side on held-out rows: loss and token accuracy on replies, preference or pairwise
    accuracy on pairs, and graded answers from the inference engine (batched), every answer kept.

    Example: posttrain eval posttrain:tiny runs/my-sft --data held_out.jsonl --grader numeric_match --json out.json
    """
    from posttrain.data.eval_rows import load_eval_rows, sample_rows
    from posttrain.eval.compare import EvalSettings, compare, results_json
    from posttrain.modeling import resolve_device

    try:
        graders = parse_graders(grader or ["text_similarity"])
        rows = sample_rows(load_eval_rows(data, split).rows, max_samples, seed)
        regression_rows = load_eval_rows(regression, split).rows if regression else []
        settings = EvalSettings(graders=graders, max_new_tokens=max_new_tokens, temperature=temperature,
                                batch_size=batch_size, max_length=max_length, seed=seed,
                                device=resolve_device(device), server_url=server, api_key=api_key)
        console.print(f"scoring {len(models)} model(s) on {len(rows)} rows of {data}"
                      + (f" and {len(regression_rows)} regression questions" if regression_rows else ""))
        reports = compare(models, rows, regression_rows, settings)
    except PosttrainError as exc:
        fail(exc.message)
    except OSError as exc:  # a server that cannot be reached, or refuses (httpx errors are OSError-like)
        fail(f"{type(exc).__name__}: {exc}", code=1)
    console.print(metrics_table(reports))
    shown = answers_table(reports, show)
    if shown is not None:
        console.print(shown)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results_json(reports, data, len(rows), settings), indent=2,
                                        ensure_ascii=False, default=str) + "\n")
        console.print(f"metrics and every answer: [bold]{json_path}[/]")
