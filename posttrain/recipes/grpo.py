"""Offline GRPO: sample a group of completions per prompt, score them with reward functions, and
push the policy towards the better ones (TRL GRPOTrainer).

Speed choices on CPU (measured with bench/sft_throughput.py --suite real, see bench/README.md):

- rollouts go through the project's batched engine (``posttrain.inference.generation.generate_batch``: one
  KV cache for the whole batch) on a bf16 copy of the policy with its LoRA deltas merged
  (``posttrain.generation_copy``), refreshed before each round, through TRL's ``rollout_func`` hook. TRL's
  own loop calls ``model.generate`` on the training model: fp32 weights, PEFT's extra matmuls per layer;
- the LM head scores the completion tokens only (``use_selected_log_probs``), as for DPO;
- with generation off the training model, its decoder layers can be compiled (``training.compile``).
"""

from __future__ import annotations

from typing import Any

from trl import GRPOConfig, GRPOTrainer
from trl.data_utils import is_conversational

from posttrain.generation_copy import GenerationCopy
from posttrain.graders import grader_rewards
from posttrain.inference.generation import SamplingParams, generate_batch
from posttrain.modeling import load_model, lora_config
from posttrain.recipes.common import (
    RecipeInputs,
    record_settings,
    shared_trainer_arguments,
    training_arguments,
    use_selected_log_probs,
)
from posttrain.rewards import resolve_reward_functions


class EngineRollouts:
    """TRL's ``rollout_func``: one completion per prompt it is handed (TRL's sampler has already repeated each
    prompt ``num_generations`` times), sampled by ``generate_batch`` from a refreshed bf16 copy of the policy.

    Prompts are rendered as TRL renders them (the chat template with the generation prompt, or the plain text
    tokenized), and every completion ends at and includes its EOS token, as in TRL's own loop. Log-probs are
    not returned: TRL recomputes them with the training model.
    """

    def __init__(self, config: GRPOConfig, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.params = SamplingParams(max_tokens=config.max_completion_length, temperature=config.temperature,
                                     top_p=config.top_p, top_k=config.top_k if config.top_k else -1)
        self.copy: GenerationCopy | None = None

    def __call__(self, prompts: list[Any], trainer: Any) -> dict[str, Any]:
        model = trainer.accelerator.unwrap_model(trainer.model)
        if self.copy is None:
            self.copy = GenerationCopy(model)
        if is_conversational({"prompt": prompts[0]}):
            prompt_ids = [list(ids) for ids in self.tokenizer.apply_chat_template(
                prompts, add_generation_prompt=True, tokenize=True, return_dict=True,
                **(trainer.chat_template_kwargs or {}))["input_ids"]]
        else:
            prompt_ids = self.tokenizer(text=prompts)["input_ids"]
        results = generate_batch(self.copy.refresh(), self.tokenizer, prompt_ids, [self.params] * len(prompt_ids))
        return {"prompt_ids": prompt_ids, "completion_ids": [r.completions[0].token_ids for r in results],
                "logprobs": None}


def use_engine_rollouts(config: GRPOConfig, inputs: RecipeInputs) -> bool:
    """Whether generate_batch can sample what TRL's loop would: on CPU, one process, text-only prompts and only
    the sampling settings the engine has (temperature, top-p, top-k)."""
    spec = inputs.spec
    return (inputs.placement.device == "cpu" and spec.distributed.launcher != "torchrun"
            and config.min_p is None and config.repetition_penalty == 1.0 and not config.generation_kwargs
            and not config.use_vllm and not config.use_transformers_continuous_batching)


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
    engine = use_engine_rollouts(config, inputs)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_functions(method.reward_functions, method.graders),
        args=config,
        peft_config=lora_config(spec),
        rollout_func=EngineRollouts(config, inputs.tokenizer) if engine else None,
        **shared_trainer_arguments(inputs),
    )
    # The entropy bonus needs the entropy's gradient, which the selected head does not give.
    selected = (inputs.placement.device == "cpu" and config.entropy_coef == 0.0 and not config.use_adaptive_entropy
                and not config.cast_lm_head_to_fp32
                and use_selected_log_probs(trainer.model, temperature=config.temperature, extras=("entropy",)))
    if selected and trainer.ref_model is not None:
        use_selected_log_probs(trainer.ref_model, temperature=config.temperature)
    record_settings(inputs, rollouts="generate_batch (bf16 merged copy)" if engine else "trl generate",
                    selected_log_probs=selected)
    return trainer


def reward_functions(names: list[str], graders: list) -> list:
    """The named reward functions, then one per grader (a spec with graders may name no function)."""
    named = resolve_reward_functions(names) if names or not graders else []
    return [*named, *grader_rewards(graders)]
