"""``remote::posttrain``: Llama Stack's core calls ``get_adapter_impl`` with the run.yaml config."""

from __future__ import annotations

from typing import Any

from llama_stack_api import Api

from posttrain.llama_stack.config import RemoteProviderConfig
from posttrain.llama_stack.jobs import RemoteJobs
from posttrain.llama_stack.post_training import PosttrainPostTraining


async def get_adapter_impl(config: RemoteProviderConfig, deps: dict[Api, Any]) -> PosttrainPostTraining:
    return PosttrainPostTraining(RemoteJobs(config), config, deps[Api.datasetio])
