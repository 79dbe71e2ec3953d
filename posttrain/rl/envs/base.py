"""What posttrain's environments share on top of atroposlib's ``BaseEnv``.

An environment hands out items (``get_next_item``), samples a group of completions for each from the
inference server, scores them and sends the scored group to the trajectory API; atroposlib's ``BaseEnv``
runs that loop, talks to the API and parses the ``serve`` / ``process`` / ``evaluate`` command lines. This
base adds what every posttrain environment needs around it:

- embedded model names (``posttrain:tiny``, ``posttrain:smollm2``) work wherever atroposlib expects a
  Hugging Face tokenizer name, because they are resolved to their local folders before atroposlib loads them;
- defaults for a local run: our inference server on port 9001 as ``server_type=vllm`` (token ids and
  logprobs through vLLM's native ``/generate``), no W&B;
- ``sample_group``: one call that samples ``group_size`` completions of a prompt and returns, for each, the
  token ids, the training mask (-100 on the prompt) and the sampling logprobs, ready for a scored group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from atroposlib.envs.base import APIServerConfig, BaseEnv, BaseEnvConfig, ScoredDataGroup
from atroposlib.envs.server_handling.server_baseline import ServerBaseline
from pydantic import Field

from posttrain.modeling import resolve_model_path
from posttrain.spec import TINY_MODEL_NAME

DEFAULT_MODEL = TINY_MODEL_NAME
DEFAULT_INFERENCE_URL = "http://localhost:9001/v1"
DEFAULT_API_URL = "http://localhost:8000"


class PosttrainEnvConfig(BaseEnvConfig):
    """atroposlib's environment settings (``--env.*``) plus the generation settings of our environments."""

    max_completion_tokens: int = Field(default=256, description="Most tokens sampled per completion.")
    temperature: float = Field(default=1.0, description="Sampling temperature of the training rollouts.")


@dataclass
class Completion:
    """One sampled completion, aligned token by token with what the trainer needs."""

    text: str
    tokens: list[int]  # prompt + completion token ids
    masks: list[int]  # -100 on the prompt (not trained), the token id on the completion
    logprobs: list[float]  # the sampling policy's logprob per token (1.0 on the prompt, atroposlib's filler)
    finish_reason: str


def scored_group(completions: list[Completion], scores: list[float]) -> ScoredDataGroup:
    """The group the trajectory API takes: tokens, masks, scores and the sampling logprobs (for the trainer's
    importance ratio against the policy that generated them)."""
    return ScoredDataGroup(
        tokens=[c.tokens for c in completions],
        masks=[c.masks for c in completions],
        scores=list(scores),
        inference_logprobs=[c.logprobs for c in completions],
    )


def resolve_tokenizer_name(name: str) -> str:
    """An embedded model name becomes its folder; hub ids and paths pass through unchanged."""
    return resolve_model_path(name) if name.startswith("posttrain:") else name


class PosttrainEnv(BaseEnv):
    """Base of posttrain's environments. Subclasses set ``name`` and ``env_config_cls`` and implement
    ``setup``, ``get_next_item``, ``collect_trajectories`` (usually ``sample_group`` then a score) and
    ``evaluate``."""

    env_config_cls = PosttrainEnvConfig

    def __init__(
        self,
        config: PosttrainEnvConfig,
        server_configs: ServerBaseline | list[APIServerConfig] | APIServerConfig,
        slurm: bool = False,
        testing: bool = False,
    ) -> None:
        config.tokenizer_name = resolve_tokenizer_name(config.tokenizer_name)
        for server in server_configs if isinstance(server_configs, list) else [server_configs]:
            # atroposlib's VLLMServer loads its tokenizer from tokenizer_name, else from model_name: the model
            # keeps its served name (what the server answers to) while the tokenizer gets the local folder.
            if server.tokenizer_name == "none" and server.model_name.startswith("posttrain:"):
                server.tokenizer_name = resolve_tokenizer_name(server.model_name)
            elif server.tokenizer_name.startswith("posttrain:"):
                server.tokenizer_name = resolve_tokenizer_name(server.tokenizer_name)
        super().__init__(config, server_configs, slurm, testing)

    @classmethod
    def default_configs(cls, **env_overrides: Any) -> tuple[PosttrainEnvConfig, list[APIServerConfig]]:
        """Settings for a local run: our inference server on :9001 spoken to as vLLM, run-api on :8000."""
        env_config = cls.env_config_cls(
            tokenizer_name=DEFAULT_MODEL,
            rollout_server_url=DEFAULT_API_URL,
            use_wandb=False,
            wandb_name=cls.name,
            **env_overrides,
        )
        server = APIServerConfig(
            model_name=DEFAULT_MODEL,
            base_url=DEFAULT_INFERENCE_URL,
            api_key="x",
            server_type="vllm",
            num_requests_for_eval=16,
            timeout=600,
        )
        return env_config, [server]

    @classmethod
    def config_init(cls) -> tuple[PosttrainEnvConfig, list[APIServerConfig]]:
        return cls.default_configs()

    async def sample_group(
        self, messages: list[dict[str, str]], n: int | None = None, temperature: float | None = None,
        split: str = "train",
    ) -> list[Completion]:
        """Sample ``n`` (default ``group_size``) completions of a chat prompt from the inference server."""
        async with self.server.managed_server(tokenizer=self.tokenizer) as managed:
            response = await managed.chat_completion(
                messages=messages,
                n=n or self.config.group_size,
                max_tokens=self.config.max_completion_tokens,
                temperature=self.config.temperature if temperature is None else temperature,
                split=split,
            )
            nodes = managed.get_state()["nodes"]
        return [
            Completion(
                text=choice.message.content or "",
                tokens=list(node.tokens),
                masks=list(node.masked_tokens),
                logprobs=list(node.logprobs),
                finish_reason=str(choice.finish_reason),
            )
            for choice, node in zip(response.choices, nodes, strict=True)
        ]
