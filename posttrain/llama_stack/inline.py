"""``inline::posttrain``: Llama Stack's core calls ``get_provider_impl`` with the run.yaml config."""

from __future__ import annotations

import asyncio
from typing import Any

from llama_stack_api import Api

from posttrain.llama_stack.config import InlineProviderConfig
from posttrain.llama_stack.jobs import LocalJobs
from posttrain.llama_stack.post_training import PosttrainPostTraining


async def get_provider_impl(config: InlineProviderConfig, deps: dict[Api, Any]) -> PosttrainPostTraining:
    jobs = await asyncio.to_thread(LocalJobs, config)
    return PosttrainPostTraining(jobs, config, deps[Api.datasetio])
