"""Sampling through an inference server's vLLM-shaped ``POST /generate`` (``posttrain rl serve-inference`` or
vLLM itself): token ids in, :class:`~posttrain.inference.generation.Completion` objects out, the same objects the
in-process :func:`~posttrain.inference.generation.generate_batch` returns, so callers do not care which one sampled.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from posttrain.errors import PosttrainError
from posttrain.inference.generation import Completion, SamplingParams

# One request per prompt, all in flight at once: the server batches concurrent requests itself.
MAX_IN_FLIGHT = 64


class GenerationError(PosttrainError):
    """The inference server could not be reached or refused a /generate request."""


class ServerSampler:
    def __init__(self, url: str, timeout_s: float = 600.0) -> None:
        self.url = url.rstrip("/").removesuffix("/v1")
        self.client = httpx.Client(base_url=self.url, timeout=timeout_s)

    def complete(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """One completion per prompt (``params.n`` is ignored: PPO samples one answer per prompt)."""
        if not prompts:
            return []
        with ThreadPoolExecutor(max_workers=min(len(prompts), MAX_IN_FLIGHT)) as pool:
            return list(pool.map(lambda prompt: self._one(prompt, params), prompts))

    def _one(self, prompt: list[int], params: SamplingParams) -> Completion:
        body: dict[str, Any] = {"prompt": {"prompt_token_ids": prompt}, "n": 1, "max_tokens": params.max_tokens,
                                "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k}
        if params.seed is not None:
            body["seed"] = params.seed
        try:
            response = self.client.post("/generate", json=body)
        except httpx.HTTPError as exc:
            raise GenerationError(f"inference server at {self.url} unreachable (/generate): {exc}") from None
        if response.status_code in (404, 405, 501):
            # No model is named, so these mean the route itself is missing: e.g. a plain `vllm serve` (404).
            raise GenerationError(f"the server at {self.url} has no POST /generate route; PPO's server rollouts "
                                  "need vLLM's native /generate with token_ids, as `posttrain rl serve-inference` "
                                  "serves it")
        if response.status_code >= 400:
            raise GenerationError(f"inference server at {self.url} refused /generate ({response.status_code}): "
                                  f"{response.text}")
        reply = response.json()
        try:
            return Completion(token_ids=[int(t) for t in reply["token_ids"][0]], text=reply["text"][0],
                              finish_reason=reply["finish_reasons"][0])
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise GenerationError(f"inference server at {self.url} answered /generate without token_ids/text/"
                                  f"finish_reasons ({exc!r}): {response.text[:200]}") from None

    def close(self) -> None:
        self.client.close()
