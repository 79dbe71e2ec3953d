"""``inline::posttrain`` inference: Llama Stack's core calls ``get_provider_impl`` with the run.yaml config."""

from __future__ import annotations

from typing import Any

from llama_stack_api import Api

from posttrain.errors import PosttrainError
from posttrain.llama_stack.config import InlineInferenceConfig
from posttrain.llama_stack.inference.chat import PosttrainInference
from posttrain.llama_stack.jobs import LocalJobs
from posttrain.llama_stack.served import LocalModels


async def get_provider_impl(_config: InlineInferenceConfig, deps: dict[Api, Any]) -> PosttrainInference:
    jobs = getattr(deps[Api.post_training], "jobs", None)
    if not isinstance(jobs, LocalJobs):
        raise PosttrainError("inference provider inline::posttrain serves what the post_training provider "
                             "inline::posttrain trains: configure that one as this stack's post_training provider")
    return PosttrainInference(LocalModels(jobs))
