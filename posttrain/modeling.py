"""Model and tokenizer loading: device and dtype choice, LoRA / QLoRA configs, adapter merging."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from posttrain.data.sources import looks_like_local_path
from posttrain.errors import ModelError, UnsupportedError
from posttrain.spec import PRECISIONS, JobSpec, ModelSpec, precision_name

log = logging.getLogger(__name__)

ModelHead = Literal["causal_lm", "sequence_classification"]

# Used only when a tokenizer ships without a chat template and the data is conversational.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ message['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def torch_dtype(precision: str) -> torch.dtype:
    """The torch dtype of a precision named the spec's way or torch's ("bf16" or "bfloat16")."""
    name = precision_name(precision)
    if name is None:
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    return getattr(torch, PRECISIONS[name])


@dataclass(frozen=True)
class Placement:
    """Where and in which precision a job trains."""

    device: str  # cpu | cuda | mps
    dtype: torch.dtype

    @property
    def mixed_precision(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "no")


def resolve_device(requested: str) -> str:
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if requested == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if requested == "cuda" and not cuda:
        raise UnsupportedError("model.device=cuda but no CUDA device is visible; use model.device=auto or cpu")
    if requested == "mps" and not mps:
        raise UnsupportedError("model.device=mps but Metal (MPS) is not available on this machine")
    return requested


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX or AVX512-BF16, from /proc/cpuinfo's flags): there
    batched bf16 matmuls run several times faster than float32 ones; elsewhere bf16 is emulated and slower."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return bool({"amx_bf16", "avx512_bf16"} & set(flags.split()))


def resolve_placement(spec: ModelSpec) -> Placement:
    device = resolve_device(spec.device)
    if spec.dtype != "auto":
        dtype = torch_dtype(spec.dtype)
        if device == "cpu" and dtype is torch.float16:
            raise UnsupportedError("model.dtype=fp16 cannot train on the CPU; use fp32 (fastest here) or bf16")
        return Placement(device, dtype)
    if device == "cuda":
        # bf16 where the GPU has it (Ampere and newer); fp16 with loss scaling on older cards.
        return Placement(device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    # CPUs without native bf16 (AVX2 only) run bf16 autocast several times slower than fp32: measured 7x here.
    return Placement(device, torch.float32)


def resolve_model_path(name: str) -> str:
    """A local folder, an embedded model (``posttrain:tiny``, ``posttrain:smollm2``), or a hub id (unchanged)."""
    from posttrain.embedded import embedded_model_path

    embedded = embedded_model_path(name)
    if embedded is not None:
        return str(embedded)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"model.name_or_path {name!r} is a file; expected a model folder or hub id")
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise ModelError(f"model.name_or_path {name!r} has no config.json: not a Hugging Face model folder")
        return str(path)
    if looks_like_local_path(name):
        raise ModelError(f"model.name_or_path {name!r} does not exist")
    return name


def apply_threads(num_threads: int | None, device: str) -> int:
    """Set torch's intra-op threads; returns the count used.

    On CPU the default is one thread: on 2-core machines two OpenMP threads were measured up to 30x
    slower than one as soon as another process competes for a core, and never much faster for
    small models. ``training.num_threads`` overrides it.
    """
    threads = num_threads or (1 if device == "cpu" else max(1, torch.get_num_threads()))
    torch.set_num_threads(threads)
    return threads


def load_tokenizer(spec: JobSpec):
    from transformers import AutoTokenizer

    path = resolve_model_path(spec.model.name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=spec.model.revision, trust_remote_code=spec.model.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the tokenizer of {spec.model.name_or_path!r}: {exc}") from None
    if spec.data.chat_template:
        tokenizer.chat_template = spec.data.chat_template
    if tokenizer.pad_token is None:
        # Decoder-only models often ship without a pad token; the eos token pads, masked out of the loss.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def ensure_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        log.warning("the tokenizer has no chat template; using a ChatML template for conversational data")
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE


# How a prompt (a string, or a conversation through the chat template) reaches a causal LM: the one rule
# for rollouts, evaluation and the reward model's input.


def render_prompt(tokenizer, prompt: str | list[dict[str, str]]) -> str:
    """The prompt as the model sees it: a conversation through the chat template, ready for the answer."""
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return prompt


def render_scored(tokenizer, prompt: str | list[dict[str, str]], answer: str) -> str:
    """Prompt + answer as the reward model was trained to read them (its own chat template for chats)."""
    if isinstance(prompt, list) and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": answer}], tokenize=False)
    if isinstance(prompt, list):
        prompt = "\n".join(message["content"] for message in prompt) + "\n"
    return prompt + answer


def encode_prompt(tokenizer, prompt: str | list[dict[str, str]], max_length: int) -> list[int]:
    text = render_prompt(tokenizer, prompt)
    ids = tokenizer(text, add_special_tokens=not isinstance(prompt, list))["input_ids"]
    return ids[-max_length:]


def quantization_config(spec: JobSpec, placement: Placement):
    if not spec.quantization.load_in_4bit:
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise UnsupportedError(f"4-bit loading needs bitsandbytes: {exc}") from None
    if placement.device == "mps":
        raise UnsupportedError("QLoRA (4-bit bitsandbytes) is not supported on MPS; use peft.type=lora")
    compute = spec.quantization.compute_dtype
    compute_dtype = placement.dtype if compute == "auto" else torch_dtype(compute)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=spec.quantization.quant_type,
        bnb_4bit_use_double_quant=spec.quantization.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_model(spec: JobSpec, placement: Placement, head: ModelHead = "causal_lm", name: str | None = None):
    """Load the base model (or ``name``, e.g. a reference model) for training on ``placement``."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    name = name or spec.model.name_or_path
    path = resolve_model_path(name)
    kwargs: dict = {
        "dtype": placement.dtype,
        "revision": spec.model.revision,
        "trust_remote_code": spec.model.trust_remote_code,
    }
    if spec.model.attn_implementation != "auto":
        kwargs["attn_implementation"] = spec.model.attn_implementation
    quant = quantization_config(spec, placement)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": placement.device if placement.device != "cuda" else torch.cuda.current_device()}
    if head == "sequence_classification":
        kwargs["num_labels"] = 1
    loader = AutoModelForSequenceClassification if head == "sequence_classification" else AutoModelForCausalLM
    try:
        model = loader.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model {name!r}: {exc}") from None
    except ImportError as exc:
        raise UnsupportedError(f"cannot load model {name!r} with these options: {exc}") from None
    # Only the training loop reads the KV cache flag; caching during training wastes memory.
    model.config.use_cache = False
    return model


def lora_config(spec: JobSpec, head: ModelHead = "causal_lm"):
    if spec.peft.type == "none":
        return None
    from peft import LoraConfig, TaskType

    modules_to_save = spec.peft.modules_to_save
    if head == "sequence_classification" and modules_to_save is None:
        # The freshly initialised score head must be trained and saved with the adapter.
        modules_to_save = ["score"]
    return LoraConfig(
        r=spec.peft.r,
        lora_alpha=spec.peft.alpha,
        lora_dropout=spec.peft.dropout,
        target_modules=spec.peft.target_modules,
        modules_to_save=modules_to_save,
        task_type=TaskType.SEQ_CLS if head == "sequence_classification" else TaskType.CAUSAL_LM,
    )


def is_adapter_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def load_for_inference(path: str | Path, device: str = "cpu"):
    """Load ``final/`` (adapter or full model) + tokenizer for generation, with plain transformers/PEFT."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"{path} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if is_adapter_dir(path):
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.to(device).eval(), tokenizer


def merge_adapter(adapter_dir: str | Path, output_dir: str | Path, base: str | None = None) -> Path:
    """Merge a LoRA adapter into its base model and save a standalone model + tokenizer.

    The output is written to a temporary sibling folder and renamed into place, so a failure
    leaves no half-written model behind.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir = Path(adapter_dir)
    output_dir = Path(output_dir)
    if not is_adapter_dir(adapter_dir):
        raise ModelError(f"{adapter_dir} is not a LoRA adapter folder (no adapter_config.json)")
    if output_dir.exists() and any(output_dir.iterdir()):
        raise ModelError(f"output folder {output_dir} exists and is not empty")
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    base_name = base or adapter_config.get("base_model_name_or_path")
    if not base_name:
        raise ModelError(f"{adapter_dir}/adapter_config.json names no base model; pass --base")
    base_path = resolve_model_path(base_name)
    try:
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    except OSError as exc:
        raise ModelError(f"cannot load base model {base_name!r}: {exc}") from None
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    tokenizer_source = adapter_dir if (adapter_dir / "tokenizer_config.json").exists() else base_path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if output_dir.exists():
            output_dir.rmdir()
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir
