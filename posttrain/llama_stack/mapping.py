"""Llama Stack post-training requests and dataset rows -> a JobSpec; posttrain job states -> Llama Stack's.

Everything here works on plain dicts (a request's ``model_dump(mode="json")``) so that it is tested row by
row without Llama Stack installed. An option posttrain cannot honour is a :class:`RequestError` naming
it, never silently dropped.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from posttrain.data.formats import convert_rows
from posttrain.data.sources import RawRow
from posttrain.errors import PosttrainError
from posttrain.llama_stack.config import TrainingDefaults
from posttrain.spec import precision_name, spec_from_dict

Method = Literal["sft", "dpo"]

# torchtune's attention module names (LoraFinetuningConfig.lora_attn_modules) -> the Hugging Face names
# of Llama-family models (Llama, Mistral, Qwen, SmolLM, posttrain:tiny). Other names pass through as the
# model's own module names.
TORCHTUNE_ATTENTION = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "output_proj": "o_proj"}
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
OUTPUT_MODULE = "lm_head"
OPTIMIZERS = {"adamw": "adamw_torch", "adam": "adamw_torch", "sgd": "sgd"}
STATES = {"queued": "scheduled", "paused": "scheduled", "running": "in_progress", "succeeded": "completed",
          "failed": "failed", "cancelled": "cancelled"}


class RequestError(PosttrainError):
    """A Llama Stack request that posttrain cannot run as asked; the message names the field."""

    status_code = 400


def _unsupported(field: str, value: Any, why: str) -> RequestError:
    return RequestError(f"{field}={json.dumps(value)} is not supported by posttrain: {why}")


# ---------------------------------------------------------------------------------------------------
# Requests -> JobSpec


def job_spec(method: Method, request: Mapping[str, Any], defaults: TrainingDefaults, *, data_source: str,
             validation_source: str | None) -> dict[str, Any]:
    """The JobSpec (as a validated dict) for a ``supervised_fine_tune`` (sft) or ``preference_optimize``
    (dpo) request. ``data_source`` / ``validation_source``: where the provider wrote the dataset rows."""
    _refuse_unused(request)
    training = _training_config(request)
    spec: dict[str, Any] = {
        "name": job_name(_job_uuid(request)),
        "model": {"name_or_path": _model(method, request), "device": defaults.device,
                  "dtype": defaults.dtype or _dtype(training.get("dtype"))},
        "data": {"source": data_source, "format": "auto"},
        "training": {"max_seq_length": defaults.max_seq_length, "gradient_checkpointing":
                     defaults.gradient_checkpointing, "seed": defaults.seed, "save_total_limit": 1,
                     **_schedule(training)},
    }
    if validation_source is not None:
        spec["data"]["validation"] = {"source": validation_source}
        spec["training"]["eval_steps"] = spec["training"]["max_steps"]  # once, at the end
    _data_config(method, training, spec)
    _optimizer_config(training.get("optimizer_config"), spec)
    _efficiency_config(training.get("efficiency_config"), spec)
    algorithm = request.get("algorithm_config")
    if method == "sft":
        spec["peft"] = _peft(algorithm)
        spec["method"] = {"name": "sft", "completion_only_loss": not _data(training).get("train_on_input", False)}
    else:
        spec["peft"] = {"type": "lora"}
        spec["method"] = _dpo(algorithm, defaults)
    try:
        return spec_from_dict(spec).model_dump(mode="json")
    except PosttrainError as exc:  # a value out of posttrain's range, e.g. a negative learning rate
        raise RequestError(f"training_config: {exc.message}") from None


# Jobs made through Llama Stack carry this in their name, so only they are Llama Stack's jobs (a service
# also runs jobs of its other doors, whose names could equal a job_uuid).
JOB_NAME_PREFIX = "llama-stack/"


def job_name(job_uuid: str) -> str:
    return JOB_NAME_PREFIX + job_uuid


def job_uuid_of(name: str | None) -> str | None:
    """The job_uuid of a job made through Llama Stack; None for any other job."""
    return name[len(JOB_NAME_PREFIX):] if name and name.startswith(JOB_NAME_PREFIX) else None


FINAL_FOLDER = "final"


def checkpoint_identifier(job_uuid: str, folder: str) -> str:
    """A job's Checkpoint identifier (``folder``: final or checkpoint-N), which is also its model's name in
    posttrain's inference providers."""
    return f"{job_uuid}/{folder}"


def _job_uuid(request: Mapping[str, Any]) -> str:
    job_uuid = request.get("job_uuid")
    if not isinstance(job_uuid, str) or not job_uuid.strip() or len(job_uuid) > 200:
        raise RequestError(f"job_uuid={json.dumps(job_uuid)}: give a non-empty string of at most 200 characters")
    return job_uuid


def _refuse_unused(request: Mapping[str, Any]) -> None:
    for field in ("hyperparam_search_config", "logger_config"):
        if request.get(field):
            raise _unsupported(field, request[field], "posttrain runs one configuration per job and logs "
                               "metrics to its job directory; send {}")
    if request.get("checkpoint_dir"):
        raise _unsupported("checkpoint_dir", request["checkpoint_dir"], "posttrain writes every job into its "
                           "own job directory (the checkpoints' path says where); leave it unset")


def _model(method: Method, request: Mapping[str, Any]) -> str:
    field = "model" if method == "sft" else "finetuned_model"
    model = request.get(field)
    if not isinstance(model, str) or not model.strip():
        raise RequestError(f"{field} is missing: name the model to train (a Hugging Face id, a local folder, "
                           "or posttrain:tiny)")
    return model


def _training_config(request: Mapping[str, Any]) -> dict[str, Any]:
    training = request.get("training_config")
    if not isinstance(training, Mapping):
        raise RequestError("training_config is missing or not an object")
    return dict(training)


def _data(training: Mapping[str, Any]) -> dict[str, Any]:
    data = training.get("data_config")
    if not isinstance(data, Mapping) or not data.get("dataset_id"):
        raise RequestError("training_config.data_config.dataset_id is missing: register a dataset with "
                           "client.beta.datasets.register and name it here")
    return dict(data)


def _dtype(value: Any) -> str:
    if value is None:
        return "auto"
    name = precision_name(value) if isinstance(value, str) else None
    if name is None:
        raise _unsupported("training_config.dtype", value, "use bf16, fp16 or fp32")
    return name


def _schedule(training: Mapping[str, Any]) -> dict[str, Any]:
    epochs = training.get("n_epochs")
    steps_per_epoch = training.get("max_steps_per_epoch", 1)
    for field, value in (("n_epochs", epochs), ("max_steps_per_epoch", steps_per_epoch),
                         ("gradient_accumulation_steps", training.get("gradient_accumulation_steps", 1))):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise RequestError(f"training_config.{field}={json.dumps(value)}: give a positive integer")
    # Llama Stack counts optimizer steps per epoch; posttrain's max_steps is the total over all epochs.
    return {"num_train_epochs": float(epochs), "max_steps": epochs * steps_per_epoch,
            "gradient_accumulation_steps": training.get("gradient_accumulation_steps", 1)}


def _data_config(method: Method, training: Mapping[str, Any], spec: dict[str, Any]) -> None:
    data = _data(training)
    if data.get("shuffle") is False:
        raise _unsupported("training_config.data_config.shuffle", False,
                           "posttrain always shuffles training rows (seeded); send shuffle=true")
    batch_size = data.get("batch_size", 1)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise RequestError(f"training_config.data_config.batch_size={json.dumps(batch_size)}: give a positive "
                           "integer")
    spec["training"]["per_device_train_batch_size"] = batch_size
    spec["training"]["per_device_eval_batch_size"] = batch_size
    if data.get("packed"):
        if method != "sft":
            raise _unsupported("training_config.data_config.packed", True, "packing applies to SFT only")
        spec["training"]["packing"] = True
    if method != "sft" and data.get("train_on_input"):
        raise _unsupported("training_config.data_config.train_on_input", True, "DPO learns from the chosen and "
                           "rejected answers only")


def _optimizer_config(optimizer: Any, spec: dict[str, Any]) -> None:
    if optimizer is None:
        return
    kind = optimizer.get("optimizer_type", "adamw")
    if kind not in OPTIMIZERS:
        raise _unsupported("training_config.optimizer_config.optimizer_type", kind, "use adamw, adam or sgd")
    weight_decay = optimizer.get("weight_decay", 0.0)
    if kind == "adam" and weight_decay:
        # Adam's L2 penalty and AdamW's decoupled decay differ unless the decay is 0.
        raise _unsupported("training_config.optimizer_config.optimizer_type", kind,
                           "Adam with weight_decay > 0 is not available; use adamw (decoupled weight decay)")
    spec["training"].update(optim=OPTIMIZERS[kind], learning_rate=optimizer.get("lr", 2e-4),
                            weight_decay=weight_decay, warmup_steps=optimizer.get("num_warmup_steps", 0) or 0)


def _efficiency_config(efficiency: Any, spec: dict[str, Any]) -> None:
    if efficiency is None:
        return
    if efficiency.get("enable_activation_checkpointing") is not None:
        spec["training"]["gradient_checkpointing"] = bool(efficiency["enable_activation_checkpointing"])
    for field, why in (("enable_activation_offloading", "activation offloading is not implemented"),
                       ("memory_efficient_fsdp_wrap", "FSDP needs the torchrun launcher, not available yet"),
                       ("fsdp_cpu_offload", "FSDP needs the torchrun launcher, not available yet")):
        if efficiency.get(field):
            raise _unsupported(f"training_config.efficiency_config.{field}", True, why)


def _peft(algorithm: Any) -> dict[str, Any]:
    if algorithm is None:
        return {"type": "none"}  # no algorithm_config: a full fine-tune
    kind = algorithm.get("type")
    if kind == "QAT":
        raise _unsupported("algorithm_config.type", "QAT", "quantization-aware training is not implemented; "
                           "use LoRA (quantize_base=true for QLoRA)")
    if kind != "LoRA":
        raise _unsupported("algorithm_config.type", kind, "use LoRA, or no algorithm_config for a full fine-tune")
    if algorithm.get("use_dora"):
        raise _unsupported("algorithm_config.use_dora", True, "DoRA is not implemented; use plain LoRA")
    modules = [TORCHTUNE_ATTENTION.get(name, name) for name in algorithm.get("lora_attn_modules") or []]
    if algorithm.get("apply_lora_to_mlp"):
        modules += MLP_MODULES
    if algorithm.get("apply_lora_to_output"):
        modules.append(OUTPUT_MODULE)
    if not modules:
        raise RequestError("algorithm_config.lora_attn_modules is empty and neither apply_lora_to_mlp nor "
                           "apply_lora_to_output is set: name the modules to adapt")
    return {"type": "qlora" if algorithm.get("quantize_base") else "lora", "r": algorithm.get("rank", 8),
            "alpha": algorithm.get("alpha", 16), "target_modules": list(dict.fromkeys(modules))}


def _dpo(algorithm: Any, defaults: TrainingDefaults) -> dict[str, Any]:
    algorithm = dict(algorithm or {})
    loss_type = algorithm.get("loss_type") or defaults.dpo_loss_type
    if loss_type not in ("sigmoid", "hinge", "ipo"):
        raise _unsupported("algorithm_config.loss_type", loss_type, "use sigmoid, hinge or ipo")
    return {"name": "dpo", "beta": algorithm.get("beta") or defaults.dpo_beta, "loss_type": loss_type,
            "use_reference_model": defaults.use_reference_model}


# ---------------------------------------------------------------------------------------------------
# Dataset rows (read through Llama Stack's datasetio) -> posttrain rows


def posttrain_rows(rows: Iterable[Mapping[str, Any]], method: Method, dataset_id: str,
                   data_format: str | None = None) -> list[dict[str, Any]]:
    """Llama Stack's row shapes as rows posttrain reads: ``messages`` rows stay messages; ``instruct``
    rows (``chat_completion_input`` or ``input_query`` plus ``expected_answer``) and ``dialog`` rows become
    messages; ``prompt``/``chosen``/``rejected`` rows stay preference rows. Every row is then checked the
    way the worker will read it, so a bad row fails the request, naming the dataset and row."""
    label = f"dataset {dataset_id!r}"
    converted = []
    for number, row in enumerate(rows, 1):
        try:
            converted.append(_row(dict(row), data_format))
        except ValueError as exc:
            raise RequestError(f"{label} row {number}: {exc}") from None
    if not converted:
        raise RequestError(f"{label} has no rows")
    raw = (RawRow(label, number, row) for number, row in enumerate(converted, 1))
    try:
        convert_rows(raw, method, source=label)
    except PosttrainError as exc:
        raise RequestError(exc.message) from None
    return converted


def _present(value: Any) -> bool:
    # Rows read from CSV files hold NaN (pandas) or "" where a cell is empty.
    return value is not None and value != "" and not (isinstance(value, float) and math.isnan(value))


def _row(row: dict[str, Any], data_format: str | None) -> dict[str, Any]:
    row = {key: value for key, value in row.items() if _present(value)}
    if "chosen" in row or "rejected" in row:
        return {key: _messages(value) if isinstance(value, list | str) and _is_chat(value) else value
                for key, value in row.items() if key in ("prompt", "chosen", "rejected")}
    if "messages" in row:
        return {"messages": _messages(row["messages"])}
    if "dialog" in row:
        return {"messages": _messages(row["dialog"])}
    if "expected_answer" in row and ("chat_completion_input" in row or "input_query" in row):
        if "chat_completion_input" in row:
            prompt = _messages(row["chat_completion_input"])
        else:
            prompt = [{"role": "user", "content": _text(row["input_query"])}]
        return {"messages": [*prompt, {"role": "assistant", "content": _text(row["expected_answer"])}]}
    expected = {"instruct": "chat_completion_input (or input_query) and expected_answer",
                "dialog": "dialog"}.get(data_format or "", "messages, chat_completion_input + expected_answer, "
                                                             "dialog, or prompt/chosen/rejected")
    raise ValueError(f"has columns {sorted(row)}; expected {expected}")


def _is_chat(value: Any) -> bool:
    return isinstance(value, list) or (isinstance(value, str) and value.lstrip().startswith("[{"))


def _messages(value: Any) -> list[dict[str, str]]:
    """A list of Llama Stack messages (or its JSON string), each reduced to role and text content."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"holds a string that is not a JSON list of messages ({exc.msg})") from None
    if not isinstance(value, list):
        raise ValueError(f"messages must be a list, got {type(value).__name__}")
    messages = []
    for item in value:
        if not isinstance(item, Mapping):
            raise ValueError(f"a message must be an object, got {type(item).__name__}")
        messages.append({"role": item.get("role"), "content": _text(item.get("content"))})
    return messages


def _text(content: Any) -> Any:
    """Llama Stack message content may be a list of content items; keep their text."""
    if isinstance(content, list):
        parts = [item.get("text") for item in content if isinstance(item, Mapping) and item.get("type") == "text"]
        if len(parts) != len(content):
            raise ValueError("message content holds non-text items (images are not supported)")
        return "".join(parts)
    return content


def split_validation(rows: list[dict[str, Any]], defaults: TrainingDefaults,
                     training: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Hold out ``validation_split`` of the rows (at least one, at most ``max_validation_steps`` batches)
    for validation_loss and perplexity. With too few rows or a split of 0, validate on training rows."""
    data = training.get("data_config") or {}
    batches = training.get("max_validation_steps") or 1
    cap = batches * int(data.get("batch_size") or 1)
    held = min(cap, max(1, round(len(rows) * defaults.validation_split))) if defaults.validation_split else 0
    if held == 0 or len(rows) - held < 1:
        return rows, rows[:cap]
    order = list(range(len(rows)))
    random.Random(defaults.seed).shuffle(order)
    chosen = set(order[:held])
    return ([row for index, row in enumerate(rows) if index not in chosen],
            [row for index, row in enumerate(rows) if index in chosen])


# ---------------------------------------------------------------------------------------------------
# posttrain jobs -> Llama Stack job shapes


def job_status(state: str) -> str:
    return STATES[state]


def training_metrics(records: list[Mapping[str, Any]], epoch: int) -> dict[str, float] | None:
    """Llama Stack's PostTrainingMetric from a job's metrics records: the last training loss and the last
    validation loss (and its perplexity); None until both exist."""
    train = [record["loss"] for record in records if isinstance(record.get("loss"), int | float)]
    validation = [record["eval_loss"] for record in records if isinstance(record.get("eval_loss"), int | float)]
    if not train or not validation:
        return None
    return {"epoch": epoch, "train_loss": float(train[-1]), "validation_loss": float(validation[-1]),
            "perplexity": math.exp(min(float(validation[-1]), 700.0))}
