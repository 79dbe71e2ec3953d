"""Answers to held-out prompts, from the project's one inference engine, and their grades.

An :class:`Answerer` turns prompts (strings or conversations) into answer texts. Three stand behind the same
call: :class:`LiveModel` (the model a job is training, in the trainer's own process, through
:func:`posttrain.inference.generation.generate_batch`), :class:`EngineModel` (a saved model in an
:class:`~posttrain.inference.engine.InferenceEngine`, as serving runs it) and :class:`ServerModel` (a model an
OpenAI-compatible server serves, by its id). Prompts are generated in batches of similar length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from pydantic import BaseModel

from posttrain.data.eval_rows import EvalRow, Text
from posttrain.graders import expand_shorthand, text_scorer
from posttrain.inference.generation import SamplingParams, generate_batch
from posttrain.modeling import encode_prompt

# Room kept for the answer when a prompt is cut to fit the model's context (its last tokens are kept).
DEFAULT_CONTEXT = 2048


class Answerer(Protocol):
    def answer(self, prompts: Sequence[Text], max_new_tokens: int, temperature: float, seed: int = 0) -> list[str]:
        """One answer per prompt, in order."""
        ...


def sampling(max_new_tokens: int, temperature: float, seed: int) -> SamplingParams:
    # Greedy answers need no seed; sampled ones are reproducible per prompt.
    return SamplingParams(max_tokens=max_new_tokens, temperature=temperature,
                          seed=seed if temperature > 0 else None)


def context_length(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", None) or DEFAULT_CONTEXT)


def encode_prompts(tokenizer, prompts: Sequence[Text], max_new_tokens: int, context: int) -> list[list[int]]:
    return [encode_prompt(tokenizer, prompt, max(1, context - max_new_tokens)) for prompt in prompts]


class LiveModel:
    """The model being trained, answering in its own process: ``generate_batch`` over batches of
    ``batch_size`` prompts of similar length, in eval mode (the caller restores the training mode)."""

    def __init__(self, model, tokenizer, batch_size: int) -> None:
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def answer(self, prompts: Sequence[Text], max_new_tokens: int, temperature: float, seed: int = 0) -> list[str]:
        from posttrain.eval.metrics import evaluating

        ids = encode_prompts(self.tokenizer, prompts, max_new_tokens, context_length(self.model))
        order = sorted(range(len(ids)), key=lambda index: len(ids[index]))
        answers = [""] * len(ids)
        with evaluating(self.model):
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                params = [sampling(max_new_tokens, temperature, seed + index) for index in chunk]
                results = generate_batch(self.model, self.tokenizer, [ids[index] for index in chunk], params)
                for index, result in zip(chunk, results, strict=True):
                    answers[index] = result.completions[0].text
        return answers


class EngineModel:
    """A saved model in the inference engine serving uses: every prompt is submitted at once and the engine
    batches them as it batches concurrent requests."""

    def __init__(self, engine, adapter: str | None = None) -> None:
        self.engine, self.adapter = engine, adapter

    def answer(self, prompts: Sequence[Text], max_new_tokens: int, temperature: float, seed: int = 0) -> list[str]:
        ids = encode_prompts(self.engine.tokenizer, prompts, max_new_tokens, self.engine.max_model_len)
        futures = [self.engine.submit(prompt, sampling(max_new_tokens, temperature, seed + index), self.adapter)
                   for index, prompt in enumerate(ids)]
        return [future.result().completions[0].text for future in futures]


class ServerModel:
    """A model an OpenAI-compatible server serves (``POST /v1/chat/completions``; a plain-string prompt goes to
    ``/v1/completions``), asked ``concurrency`` prompts at a time so the server can batch them."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, concurrency: int = 16,
                 timeout_s: float = 600.0) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s)
        self.model, self.concurrency = model, concurrency

    def _one(self, prompt: Text, max_new_tokens: int, temperature: float, seed: int) -> str:
        body: dict[str, Any] = {"model": self.model, "max_tokens": max_new_tokens, "temperature": temperature}
        if temperature > 0:
            body["seed"] = seed
        if isinstance(prompt, str):
            response = self.client.post("/v1/completions", json={**body, "prompt": prompt})
            response.raise_for_status()
            return str(response.json()["choices"][0]["text"])
        response = self.client.post("/v1/chat/completions", json={**body, "messages": prompt})
        response.raise_for_status()
        return str(response.json()["choices"][0]["message"]["content"] or "")

    def answer(self, prompts: Sequence[Text], max_new_tokens: int, temperature: float, seed: int = 0) -> list[str]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda pair: self._one(pair[1], max_new_tokens, temperature, seed + pair[0]),
                                 enumerate(prompts)))

    def close(self) -> None:
        self.client.close()


# The regression set's rule: the reference answer occurs in the reply, ignoring case.
REGRESSION_GRADER = "string_check"


def regression_grader() -> BaseModel:
    from pydantic import TypeAdapter

    from posttrain.graders import Grader

    return TypeAdapter(Grader).validate_python(expand_shorthand(REGRESSION_GRADER))


Scorer = Callable[[list[str], list[dict[str, Any]]], list[float]]


def scorers(graders: Sequence[BaseModel]) -> dict[str, Scorer]:
    """Each grader's ``score(texts, items)`` by its name, built once (a python grader's code runs here)."""
    return {getattr(grader, "name", "grader"): text_scorer(grader) for grader in graders}


def grade(by_name: dict[str, Scorer], answers: list[str], rows: list[EvalRow]) -> dict[str, list[float]]:
    """Each grader's score of each answer, by grader name."""
    items = [row.item for row in rows]
    return {name: score(answers, items) for name, score in by_name.items()}


def answer_records(which: str, rows: list[EvalRow], answers: list[str], scores: dict[str, list[float]]
                   ) -> list[dict[str, Any]]:
    """The answers as kept (eval/answers-step-N.jsonl, posttrain eval's JSON): the set they belong to (held_out,
    regression), the prompt, the reference answer, the answer and its scores."""
    return [{"set": which, "prompt": row.prompt, "reference": row.answer, "answer": answer,
             "scores": {name: values[index] for name, values in scores.items()}}
            for index, (row, answer) in enumerate(zip(rows, answers, strict=True))]
