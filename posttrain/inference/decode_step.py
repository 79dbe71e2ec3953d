"""One decode step of a Llama-architecture model over a :class:`KVWindow`, in a few ops a layer.

A decode step computes one token per row. transformers' forward spends as much time around the matrix
products as in them when rows are few: per layer it runs about sixty tensor ops and as many Python calls
(module wrappers, mask and cache helpers, keyword plumbing), and multiplies one row by a bf16 weight
through oneDNN's matrix-matrix path, which reads the weight at a fraction of the machine's bandwidth.
Here a step is the same arithmetic written directly against the module's parameters: one ``rms_norm``
per norm, the rotary embedding on ``[rows, heads, dim]`` views, keys and values written into the window's
buffers in place, ``scaled_dot_product_attention`` with the key/value heads' queries packed as transformers
packs them, and, in bfloat16 with a single row, ``torch.mv`` (a matrix-vector kernel that streams the
weight) for every projection. In float32 the step calls the same kernels as transformers, in the same
order, so its logits are bit-identical to the model's own (``tests/inference/test_decode_step.py``).

Used for models whose layers are exactly transformers' Llama ones (Llama, SmolLM, and posttrain:tiny)
with plain ``nn.Linear`` projections, or PEFT LoRA layers over them when :class:`RowLora` applies the
adapters; anything else (other architectures, biases, quantized layers, rope types that depend on the
sequence length, PEFT's own adapter path) takes transformers' forward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from posttrain.inference.kv_window import KVWindow
from posttrain.inference.row_lora import RowLora

ROPE_TYPES = {"default", "linear", "llama3"}  # those whose frequencies do not depend on the sequence length


def _llama_model(model: Any) -> Any | None:
    """The ``LlamaModel`` inside ``model`` (a LlamaForCausalLM, or a PeftModel around one), else None."""
    from transformers.models.llama.modeling_llama import LlamaForCausalLM

    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    return causal.model if type(causal) is LlamaForCausalLM else None


def _weight(module: Any, lora: bool) -> torch.nn.Parameter | None:
    """The projection's weight if it is a plain Linear, or (``lora``: RowLora applies the adapters) a PEFT
    LoRA layer over one; None for anything else."""
    from peft.tuners.lora import LoraLayer

    if lora and isinstance(module, LoraLayer):
        module = module.base_layer
    if type(module) is not torch.nn.Linear or module.bias is not None:
        return None
    return module.weight


class LlamaDecodeStep:
    """Built per model (and again when PEFT wraps its layers); :meth:`logits` runs one step."""

    def __init__(self, model: Any, lora: bool) -> None:
        inner = _llama_model(model)
        assert inner is not None
        config = inner.config
        self.model = model
        self.lora = lora
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.embedding = inner.embed_tokens.weight
        self.rotary = inner.rotary_emb
        self.norm = inner.norm
        self.head = _weight(model.get_output_embeddings(), lora)
        self.head_modules = (model.get_output_embeddings(),)
        self.layers = [_Layer(layer, lora) for layer in inner.layers]

    @staticmethod
    def supports(model: Any, lora: bool) -> bool:
        """Whether :meth:`logits` computes exactly what ``model``'s forward does for a decode step."""
        inner = _llama_model(model)
        if inner is None:
            return False
        config = inner.config
        rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
        if (rope not in ROPE_TYPES or config.hidden_act != "silu" or getattr(config, "pretraining_tp", 1) != 1
                or config._attn_implementation not in ("sdpa", "eager")):
            return False
        if _weight(model.get_output_embeddings(), lora) is None:
            return False
        for layer in inner.layers:
            attention, mlp = layer.self_attn, layer.mlp
            modules = (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj, mlp.gate_proj,
                       mlp.up_proj, mlp.down_proj)
            if any(_weight(module, lora) is None for module in modules):
                return False
        return True

    @torch.inference_mode()
    def logits(self, tokens: torch.Tensor, positions: torch.Tensor, window: KVWindow, mask: torch.Tensor,
               row_lora: RowLora | None) -> torch.Tensor:
        """The next-token logits ``[rows, vocab]`` of one token per row (``tokens``, ``positions``: ``[rows]``),
        their keys and values written at the window's current column (the caller advances it after)."""
        rows = tokens.shape[0]
        hidden = F.embedding(tokens, self.embedding)
        freqs = positions[:, None].float() * self.rotary.inv_freq.float()[None]
        angles = torch.cat((freqs, freqs), dim=-1)
        scaling = self.rotary.attention_scaling
        cos = (angles.cos() * scaling).to(hidden.dtype)[:, None, :]
        sin = (angles.sin() * scaling).to(hidden.dtype)[:, None, :]
        vector = rows == 1 and hidden.dtype == torch.bfloat16
        end, start = window.end, window.start
        shape = (hidden.shape[-1],)
        for layer, cache in zip(self.layers, window.layers, strict=True):
            normed = F.rms_norm(hidden, shape, layer.input_norm.weight, layer.input_norm.variance_epsilon)
            query = _project(normed, layer.q, vector)
            key = _project(normed, layer.k, vector)
            value = _project(normed, layer.v, vector)
            if row_lora is not None:
                row_lora.add_group(layer.qkv_modules, normed, (query, key, value))
            query = _rotate(query.view(rows, self.heads, self.head_dim), cos, sin)
            key = _rotate(key.view(rows, self.kv_heads, self.head_dim), cos, sin)
            assert cache.key_buffer is not None and cache.value_buffer is not None
            cache.key_buffer[:rows, :, end] = key
            cache.value_buffer[:rows, :, end] = value.view(rows, self.kv_heads, self.head_dim)
            # The query heads that share a key/value head as that head's query positions (transformers'
            # pack_gqa for one query token): no key/value copy per query head.
            attended = F.scaled_dot_product_attention(
                query.view(rows, self.kv_heads, self.heads // self.kv_heads, self.head_dim),
                cache.key_buffer[:rows, :, start:end + 1], cache.value_buffer[:rows, :, start:end + 1],
                attn_mask=mask, scale=layer.scaling)
            attended = attended.reshape(rows, self.heads * self.head_dim)
            out = _project(attended, layer.o, vector)
            if row_lora is not None:
                row_lora.add_group(layer.o_modules, attended, (out,))
            hidden = hidden + out
            normed = F.rms_norm(hidden, shape, layer.post_norm.weight, layer.post_norm.variance_epsilon)
            gate = _project(normed, layer.gate, vector)
            up = _project(normed, layer.up, vector)
            if row_lora is not None:
                row_lora.add_group(layer.gate_up_modules, normed, (gate, up))
            product = F.silu(gate) * up
            out = _project(product, layer.down, vector)
            if row_lora is not None:
                row_lora.add_group(layer.down_modules, product, (out,))
            hidden = hidden + out
        hidden = F.rms_norm(hidden, shape, self.norm.weight, self.norm.variance_epsilon)
        assert self.head is not None
        logits = _project(hidden, self.head, vector)
        if row_lora is not None:
            row_lora.add_group(self.head_modules, hidden, (logits,))
        return logits


class _Layer:
    def __init__(self, layer: Any, lora: bool) -> None:
        attention, mlp = layer.self_attn, layer.mlp
        self.input_norm = layer.input_layernorm
        self.post_norm = layer.post_attention_layernorm
        self.scaling = attention.scaling
        self.q, self.k, self.v, self.o = (_weight(m, lora) for m in (attention.q_proj, attention.k_proj,
                                                                      attention.v_proj, attention.o_proj))
        self.gate, self.up, self.down = (_weight(m, lora) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        self.qkv_modules = (attention.q_proj, attention.k_proj, attention.v_proj)
        self.o_modules = (attention.o_proj,)
        self.gate_up_modules = (mlp.gate_proj, mlp.up_proj)
        self.down_modules = (mlp.down_proj,)


def _project(x: torch.Tensor, weight: Any, vector: bool) -> torch.Tensor:
    if vector:
        return torch.mv(weight, x[0])[None]
    return F.linear(x, weight)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' ``x * cos + rotate_half(x) * sin``, op for op."""
    half = x.shape[-1] // 2
    return (x * cos) + (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin)
