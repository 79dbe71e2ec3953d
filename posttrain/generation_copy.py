"""A plain, adapter-merged copy of a training model in bf16 (where native), for sampling rollouts from it.

On CPU, a trainer that samples from the model it trains pays three taxes per generated token: fp32 matmuls
(or, under autocast, a cast of every frozen weight on every decode step: autocast caches casts only of
weights that train), PEFT's two extra matmuls and bookkeeping on every adapted linear layer (210 of them
per SmolLM2 token), and the trainer's wrappers. Sampling from a copy whose LoRA deltas are merged into bf16
weights decodes with one bf16 matmul per linear layer instead. The copy is refreshed from the training
weights before each round of rollouts (a cast and a rank-r product per adapted layer: ~0.2 s on SmolLM2-135M),
so the samples come from the current policy, rounded to bf16 as vLLM would serve it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch


def generation_dtype(device: str) -> torch.dtype:
    """bf16 where the hardware computes it natively (CUDA, or a CPU with AVX512-BF16 or AMX); fp32 elsewhere:
    AVX2-only CPUs emulate bf16 several times slower than fp32 (bench/README.md)."""
    if device == "cuda" or torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
        return torch.bfloat16
    return torch.float32


class GenerationCopy:
    """Holds the copy of ``model`` (a transformers causal LM, PEFT-wrapped or not) and refreshes it."""

    def __init__(self, model: Any, dtype: torch.dtype | None = None) -> None:
        self.source = model
        self.dtype = dtype or generation_dtype(next(model.parameters()).device.type)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if hasattr(model, "merge_and_unload"):
            # A deep copy keeps the adapter modules; merging them into that copy leaves plain linear layers.
            plain = copy.deepcopy(model).merge_and_unload()
        else:
            plain = copy.deepcopy(base)
        # A trainer may have patched the instance's forward (TRL's fused LM head, posttrain's selected head): the
        # deep copy would keep that bound method, which still calls the training model. The class's forward it is.
        vars(plain).pop("forward", None)
        # Parameters only: buffers such as the rotary frequencies stay fp32, as transformers keeps them when it
        # loads a bf16 model (in bf16 the positions lose precision, and decoding was measured 2.8x slower).
        for parameter in plain.parameters():
            parameter.data = parameter.data.to(self.dtype)
        plain.config.dtype = self.dtype
        # requires_grad on, though nothing trains it (generation runs under inference_mode): with it off, as
        # a LoRA base's frozen weights come, torch 2.13 multiplies a sliced [rows, 1, dim] input by the LM head
        # as a batched matmul over a copy of the weight per row (5.4 s instead of 13 ms for 32 rows of SmolLM2).
        self.model = plain.requires_grad_(True).eval()
        self.model.config.use_cache = True

    @torch.no_grad()
    def refresh(self) -> Any:
        """Copy the training weights (adapter deltas merged) into the copy; returns the copy."""
        target = dict(self.model.named_parameters())
        base = self.source.get_base_model() if hasattr(self.source, "get_base_model") else self.source
        for name, module in base.named_modules():
            delta = getattr(module, "get_delta_weight", None)
            layer = getattr(module, "base_layer", None)
            if delta is not None and layer is not None:
                weight = layer.weight.detach().float()
                for adapter in module.active_adapters:
                    if adapter in getattr(module, "lora_A", {}):
                        weight = weight + delta(adapter).float()
                target[f"{name}.weight"].copy_(weight)
                if layer.bias is not None:
                    target[f"{name}.bias"].copy_(layer.bias)
        for name, parameter in base.named_parameters():
            plain_name = name.replace(".base_layer.", ".")
            if "lora_" not in name and ".base_layer." not in name and plain_name in target:
                target[plain_name].copy_(parameter.detach())
        return self.model
