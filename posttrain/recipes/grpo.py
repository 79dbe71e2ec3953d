"""Offline GRPO: sample a group of completions per prompt, score them with reward functions, and
push the policy towards the better ones (TRL GRPOTrainer)."""

from __future__ import annotations

from trl import GRPOConfig, GRPOTrainer

from posttrain.graders import grader_rewards
from posttrain.modeling import load_model, lora_config
from posttrain.recipes.common import RecipeInputs, shared_trainer_arguments, training_arguments
from posttrain.rewards import resolve_reward_functions


def build_trainer(inputs: RecipeInputs) -> GRPOTrainer:
    spec = inputs.spec
    method = spec.method
    # Generation batches prompts of different lengths: pad on the left so completions line up.
    inputs.tokenizer.padding_side = "left"
    model = load_model(spec, inputs.placement)
    model.generation_config.pad_token_id = inputs.tokenizer.pad_token_id
    kwargs = training_arguments(inputs, model.num_parameters())
    config = GRPOConfig(
        **kwargs,
        num_generations=method.num_generations,
        max_completion_length=method.max_completion_length,
        temperature=method.temperature,
        beta=method.beta,
        loss_type=method.loss_type,
        reward_weights=method.reward_weights,
        log_completions=False,
    )
    return GRPOTrainer(
        model=model,
        reward_funcs=reward_functions(method.reward_functions, method.graders),
        args=config,
        peft_config=lora_config(spec),
        **shared_trainer_arguments(inputs),
    )


def reward_functions(names: list[str], graders: list) -> list:
    """The named reward functions, then one per grader (a spec with graders may name no function)."""
    named = resolve_reward_functions(names) if names or not graders else []
    return [*named, *grader_rewards(graders)]
