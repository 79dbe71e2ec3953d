"""LoRA adapters chosen per row of one forward, at the cost of one adapter whatever the mix.

PEFT's own per-row path (``adapter_names``) computes each adapter on its rows separately: per LoRA layer
and adapter an index, two matmuls, a scale and an indexed add, so a decode step over 4 adapters runs
thousands of small ops more than the base model. Here every loaded adapter's ``A`` matrices are stacked
into one ``[total rank, in]`` matrix per layer and its ``B`` matrices (scaling folded in) into one
``[out, total rank]``; a step computes ``base(x) + ((x @ A.T) * mask) @ B.T`` with a ``[rows, total rank]``
mask that keeps each row to its own adapter's columns (none for a base row): four ops per layer for any
number of adapters, and a few percent more multiply-adds. (The idea of vLLM's and S-LoRA's batched LoRA
kernels, with a mask in place of a gather.)

Used for plain LoRA on ``nn.Linear`` layers, which is what posttrain trains; a model with anything else
(DoRA and other variants, LoRA on embeddings, ``modules_to_save``) keeps PEFT's path. The stacked copies
are rebuilt whenever the adapters change (:attr:`AdapterSlots.version`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F


def lora_layers(model: Any) -> list[Any]:
    from peft.tuners.lora import LoraLayer

    return [module for module in model.modules() if isinstance(module, LoraLayer)]


def supports(model: Any) -> bool:
    """Whether every adapter of this PEFT model is plain LoRA on Linear layers."""
    from peft.tuners.lora import Linear
    from peft.utils import ModulesToSaveWrapper

    if any(isinstance(module, ModulesToSaveWrapper) for module in model.modules()):
        return False
    for layer in lora_layers(model):
        if not isinstance(layer, Linear) or layer.fan_in_fan_out or layer.lora_variant or layer.lora_embedding_A:
            return False
        if any(layer.lora_bias.values()):
            return False
    return True


class RowLora:
    """Per-row LoRA over a PEFT model's adapters (``slots``: PEFT adapter names in column order)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.layers = lora_layers(model)
        self.version = -1
        self.columns: dict[str, tuple[int, int]] = {}  # adapter -> its columns in the stacked rank dimension
        self.total_rank = 0
        self._stacked: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(layer) -> (A, B scaled)
        self._groups: dict[tuple[int, ...], _Group | None] = {}  # layers sharing an input -> their fused A
        self._mask: torch.Tensor | None = None
        self._tiled: dict[int, torch.Tensor] = {}  # the mask repeated for a group of n layers, this forward
        self._hooks = [layer.register_forward_hook(self._add_delta) for layer in self.layers]

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def rebuild(self, adapters: list[str], version: int) -> None:
        """Stack the weights of ``adapters`` (after any load, unload or in-place update)."""
        self.layers = lora_layers(self.model)
        for hook in self._hooks:
            hook.remove()
        self._hooks = [layer.register_forward_hook(self._add_delta) for layer in self.layers]
        ranks = {}
        for layer in self.layers:
            for name in adapters:
                if name in layer.lora_A:
                    ranks[name] = layer.lora_A[name].weight.shape[0]
        self.columns, start = {}, 0
        for name in adapters:
            if name in ranks:
                self.columns[name] = (start, start + ranks[name])
                start += ranks[name]
        self.total_rank = start
        self._stacked = {}
        for layer in self.layers:
            base = layer.base_layer.weight
            stacked_a = torch.zeros((self.total_rank, layer.in_features), dtype=base.dtype, device=base.device)
            stacked_b = torch.zeros((layer.out_features, self.total_rank), dtype=base.dtype, device=base.device)
            for name, (first, last) in self.columns.items():
                if name in layer.lora_A:
                    stacked_a[first:last] = layer.lora_A[name].weight.detach()
                    stacked_b[:, first:last] = layer.lora_B[name].weight.detach() * layer.scaling[name]
            self._stacked[id(layer)] = (stacked_a, stacked_b)
            layer.enable_adapters(False)  # the layer computes only its base; _add_delta adds the adapters
        self._groups = {}
        self.version = version

    @contextmanager
    def rows(self, adapters: list[str | None]) -> Iterator[None]:
        """Inside: a forward over ``len(adapters)`` rows applies each row's adapter (None: the base model)."""
        first = next(iter(self._stacked.values()), None)
        if first is None or not any(a in self.columns for a in adapters):
            yield  # only base rows: nothing to add
            return
        mask = torch.zeros((len(adapters), 1, self.total_rank), dtype=first[0].dtype, device=first[0].device)
        for row, name in enumerate(adapters):
            if name in self.columns:
                begin, end = self.columns[name]
                mask[row, 0, begin:end] = 1
        self._mask = mask
        self._tiled = {1: mask.view(len(adapters), self.total_rank)}
        try:
            yield
        finally:
            self._mask = None
            self._tiled = {}

    def add_group(self, layers: tuple[Any, ...], x: torch.Tensor, outputs: tuple[torch.Tensor, ...]) -> None:
        """Inside :meth:`rows`, for a forward that computes ``layers``' base products itself (a decode step
        that does not call the modules): add each row's adapter to ``outputs[i] = layers[i].base(x)``
        (``x``: ``[rows, in]``). Layers that share ``x`` (q, k and v; gate and up) multiply it by their
        stacked ``A`` matrices in one product. Layers without adapters are skipped."""
        if self._mask is None:
            return
        key = tuple(map(id, layers))
        group = self._groups.get(key, _UNSET)
        if group is _UNSET:
            group = self._groups[key] = self._fuse(layers)
        if group is None:
            return
        mask = self._tiled.get(len(group.members))
        if mask is None:
            mask = self._tiled[len(group.members)] = self._tiled[1].repeat(1, len(group.members))
        if x.dtype != group.a.dtype:
            x = x.to(group.a.dtype)
        h = F.linear(x, group.a).mul_(mask)
        rank = self.total_rank
        for column, (index, stacked_b) in enumerate(group.members):
            output = outputs[index]
            part = h[:, column * rank:(column + 1) * rank]
            if output.dtype == stacked_b.dtype:
                output.addmm_(part, stacked_b.t())
            else:
                output.add_(F.linear(part, stacked_b))

    def _fuse(self, layers: tuple[Any, ...]) -> _Group | None:
        members = [(index, self._stacked[id(layer)]) for index, layer in enumerate(layers) if id(layer) in self._stacked]
        if not members:
            return None
        return _Group(torch.cat([a for _, (a, _) in members]), [(index, b) for index, (_, b) in members])

    def _add_delta(self, layer: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        mask = self._mask
        if mask is None:
            return None
        stacked_a, stacked_b = self._stacked[id(layer)]
        x = args[0]
        if x.dtype != stacked_a.dtype:
            x = x.to(stacked_a.dtype)
        h = F.linear(x, stacked_a).mul_(mask)
        if output.dtype != stacked_b.dtype or not output.is_contiguous():
            return output + F.linear(h, stacked_b).to(output.dtype)
        # In place, the add fused into the second matmul: three ops per layer in all.
        output.view(-1, output.shape[-1]).addmm_(h.view(-1, h.shape[-1]), stacked_b.t())
        return output


class _Group:
    """Layers that multiply the same input: their stacked ``A`` matrices concatenated, and each one's ``B``."""

    def __init__(self, a: torch.Tensor, members: list[tuple[int, torch.Tensor]]) -> None:
        self.a = a
        self.members = members  # (index in the group's outputs, stacked B)


_UNSET: Any = object()
