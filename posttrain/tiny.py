"""The embedded default model, ``posttrain:tiny``, and the bundled sample datasets.

``posttrain:tiny`` is a random-init Llama-architecture causal LM (hidden 64, 2 layers) with a byte-level
BPE tokenizer trained here on the bundled samples. It is built on first use into a cache folder as an
ordinary Hugging Face model folder, so everything downstream loads it with the same
``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` calls as a hub model: the
whole pipeline runs offline, in seconds, on one CPU thread.

The chat template is the Llama 3 one with ``{% generation %}`` markers around each assistant reply,
ending that reply with ``<|eot_id|>`` inside the markers. TRL renders conversational rows through the
template and appends nothing, so assistant-only and full-sequence SFT both train the model to emit
``<|eot_id|>``; for plain-text rows TRL appends ``eos_token`` (``<|end_of_text|>``). The generation
config stops on either.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

from posttrain.errors import DatasetError
from posttrain.model_cache import cached_build, quiet_transformers_bars
from posttrain.spec import TINY_MODEL_NAME

if TYPE_CHECKING:  # transformers is imported lazily: reading a sample path must stay cheap
    from transformers import PreTrainedTokenizerFast

SAMPLE_PREFIX = "posttrain:"
SAMPLE_NAMES = ("alpaca", "preference", "gsm8k")
# What `posttrain demo --model smollm2` teaches (see assets/make_samples.py). Kept out of SAMPLE_NAMES: the tiny
# tokenizer is trained on, and its cache folder named after, SAMPLE_NAMES only.
DEMO_SAMPLE_NAMES = ("style", "concise", "problems", "facts")
# Bump when the build changes in a way the fingerprint below cannot see (e.g. the chat template).
TINY_VERSION = "v2"

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|pad|>"
START_HEADER_TOKEN = "<|start_header_id|>"
END_HEADER_TOKEN = "<|end_header_id|>"
EOT_TOKEN = "<|eot_id|>"
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, START_HEADER_TOKEN, END_HEADER_TOKEN, EOT_TOKEN]
VOCAB_SIZE = 2048

# Llama 3's pre-tokenizer split. Unlike GPT-2's, it keeps a run of newlines as one piece whether or not
# text follows, so a prompt rendered with add_generation_prompt (ending in "\n\n") tokenizes to a prefix
# of the prompt with its reply: TRL's completion masks rely on that.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Llama 3 layout (TRL's llama3_training.jinja): any role, content trimmed, each turn closed by
# <|eot_id|>; for assistant turns the reply and its <|eot_id|> sit inside {% generation %} so that
# return_assistant_tokens_mask covers the token the model must learn to stop with.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.index0 == 0 %}{{- bos_token }}{%- endif %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def sample_path(name: str) -> Path:
    """Path of a bundled sample dataset: ``posttrain:alpaca`` (or ``alpaca``), ``preference``, ``gsm8k``,
    and the demo's ``style``, ``concise``, ``problems`` and ``facts``."""
    short = name.removeprefix(SAMPLE_PREFIX)
    if short not in SAMPLE_NAMES + DEMO_SAMPLE_NAMES:
        known = ", ".join(SAMPLE_PREFIX + n for n in SAMPLE_NAMES + DEMO_SAMPLE_NAMES)
        raise DatasetError(f"no bundled sample dataset of this name; bundled: {known}", source=name)
    # The package is installed as plain files (setuptools package-data), never zipped, so the resource
    # is a real file on disk.
    return Path(str(files("posttrain").joinpath("assets", f"{short}.jsonl")))


def _sample_texts() -> Iterator[str]:
    """Every string field of every bundled sample row: the tokenizer's training corpus."""
    for name in SAMPLE_NAMES:
        with sample_path(name).open(encoding="utf-8") as rows:
            for line in rows:
                if line.strip():
                    yield from (v for v in json.loads(line).values() if isinstance(v, str))
    # Chat-template role names, so that headers are single tokens.
    yield from ("system", "user", "assistant") * 8


def build_tokenizer(vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on the bundled samples and wrap it for transformers."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_sample_texts(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[START_HEADER_TOKEN, END_HEADER_TOKEN, EOT_TOKEN],
        # Like Llama 3: plain-text encoding starts with <|begin_of_text|>; the chat template adds its own.
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


FINAL_NORM_GAIN = 4.0


def build_tiny_model(
    out_dir: Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 1024,
    seed: int = 0,
) -> Path:
    """Write a random-init Llama causal LM and the tiny tokenizer to ``out_dir``; return ``out_dir``.

    The defaults are ``posttrain:tiny``; a benchmark can ask for a bigger variant (e.g. hidden 256,
    4 layers) with the same tokenizer. ``intermediate_size`` defaults to 3 x ``hidden_size``.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    bos_id, eos_id, pad_id, eot_id = tokenizer.convert_tokens_to_ids(
        [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, EOT_TOKEN]
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 3 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="float32",
    )
    # Fixed weights without disturbing the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        # With the 0.02-std init, a tied embedding and a unit final norm, logits stay within about +-1.3,
        # so LoRA adapters (which cannot touch the embedding) could barely lower the loss. A final-norm
        # gain of 4 gives them room while the model stays random (initial loss is still ln(vocab)).
        with torch.no_grad():
            model.model.norm.weight.fill_(FINAL_NORM_GAIN)
    model.generation_config = GenerationConfig(
        bos_token_id=bos_id,
        # A chat reply ends with <|eot_id|>, a plain-text completion with <|end_of_text|>.
        eos_token_id=[eot_id, eos_id],
        pad_token_id=pad_id,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # A first run would otherwise print a "Writing model shards" bar for a 700 KB file.
    with quiet_transformers_bars():
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    return out_dir


def _tiny_folder_name() -> str:
    # The samples are the tokenizer's corpus: a changed sample file must not reuse a stale build.
    digest = hashlib.sha256(TINY_VERSION.encode())
    for name in SAMPLE_NAMES:
        digest.update(sample_path(name).read_bytes())
    return f"tiny-{TINY_VERSION}-{digest.hexdigest()[:12]}"


def tiny_model_path(cache_dir: Path | None = None) -> Path:
    """Folder of ``posttrain:tiny``, built on first call and reused afterwards (safe when processes race)."""
    return cached_build(cache_dir, _tiny_folder_name(), build_tiny_model, TINY_MODEL_NAME)
