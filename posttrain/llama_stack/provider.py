"""``module: posttrain.llama_stack`` in a run.yaml makes Llama Stack call ``get_provider_spec()`` here: the
inline and the remote provider, of which it keeps the one whose provider_type the run.yaml names."""

from __future__ import annotations

from llama_stack_api import Api, InlineProviderSpec, ProviderSpec, RemoteProviderSpec

# Empty on purpose: `pip install posttrain` would pull torch into Llama Stack's environment. posttrain goes
# in with --no-deps plus its `llama-stack` extra (`make llama-stack-venv`, docs/llama-stack.md).
PIP_PACKAGES: list[str] = []
DEPENDENCIES = [Api.datasetio, Api.datasets]


def get_provider_spec() -> list[ProviderSpec]:
    return [
        InlineProviderSpec(
            api=Api.post_training, provider_type="inline::posttrain", pip_packages=PIP_PACKAGES,
            module="posttrain.llama_stack.inline", config_class="posttrain.llama_stack.config.InlineProviderConfig",
            api_dependencies=DEPENDENCIES,
            description="posttrain: SFT (full, LoRA, QLoRA) and DPO on TRL, one worker process per job on this "
            "machine; jobs outlive Llama Stack restarts."),
        RemoteProviderSpec(
            api=Api.post_training, adapter_type="posttrain", provider_type="remote::posttrain",
            pip_packages=PIP_PACKAGES, module="posttrain.llama_stack.remote",
            config_class="posttrain.llama_stack.config.RemoteProviderConfig", api_dependencies=DEPENDENCIES,
            description="posttrain job service (posttrain serve): SFT and DPO jobs on a training server."),
    ]
