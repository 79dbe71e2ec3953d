"""``module: posttrain.llama_stack.inference`` in a run.yaml makes Llama Stack call ``get_provider_spec()``
here: the inline and the remote inference provider, of which it keeps the one whose provider_type the
run.yaml names."""

from __future__ import annotations

from llama_stack_api import Api, InlineProviderSpec, ProviderSpec, RemoteProviderSpec

# As for the post_training providers: posttrain goes in with --no-deps plus its `llama-stack` extra.
PIP_PACKAGES: list[str] = []
DEPENDENCIES = [Api.post_training]  # the provider whose jobs' models these serve


def get_provider_spec() -> list[ProviderSpec]:
    return [
        InlineProviderSpec(
            api=Api.inference, provider_type="inline::posttrain", pip_packages=PIP_PACKAGES,
            module="posttrain.llama_stack.inference.inline",
            config_class="posttrain.llama_stack.config.InlineInferenceConfig", api_dependencies=DEPENDENCIES,
            description="posttrain: chat with the models the inline::posttrain post_training provider trained "
            "(OpenAI chat/completions, streamed; LoRA adapters over one copy of their base), generated in a "
            "supervised inference worker process under its worker_python."),
        RemoteProviderSpec(
            api=Api.inference, adapter_type="posttrain", provider_type="remote::posttrain",
            pip_packages=PIP_PACKAGES, module="posttrain.llama_stack.inference.remote",
            config_class="posttrain.llama_stack.config.RemoteInferenceConfig", api_dependencies=DEPENDENCIES,
            description="posttrain job service (posttrain serve): chat with the models the remote::posttrain "
            "post_training provider trained there, through the service's OpenAI routes."),
    ]
