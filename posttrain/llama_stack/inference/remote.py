"""``remote::posttrain`` inference: Llama Stack's core calls ``get_adapter_impl`` with the run.yaml config."""

from __future__ import annotations

from typing import Any

from llama_stack_api import Api

from posttrain.errors import PosttrainError
from posttrain.llama_stack.config import RemoteInferenceConfig
from posttrain.llama_stack.inference.chat import PosttrainInference
from posttrain.llama_stack.jobs import RemoteJobs
from posttrain.llama_stack.served import RemoteModels


async def get_adapter_impl(_config: RemoteInferenceConfig, deps: dict[Api, Any]) -> PosttrainInference:
    jobs = getattr(deps[Api.post_training], "jobs", None)
    if not isinstance(jobs, RemoteJobs):
        raise PosttrainError("inference provider remote::posttrain serves what the post_training provider "
                             "remote::posttrain trains: configure that one as this stack's post_training provider")
    return PosttrainInference(RemoteModels(jobs))
