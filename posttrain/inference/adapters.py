"""The inference server's LoRA adapters, kept in reusable slots so a hot swap is a tensor copy.

PEFT injects an adapter's layers into the model on load (about 0.2 s for a 135M model on CPU) and removes
them on delete. A trainer that syncs every step loads a new version each time, so instead each adapter
name maps to a *slot* (a PEFT adapter named ``slot-N``): unloading frees the slot, and loading an adapter
whose config matches a free slot (or, in place, its own slot) just copies the new tensors into it. Any
mismatch (another rank, other target modules, extra saved modules) falls back to a fresh PEFT load.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

FREE_SLOTS_KEPT = 2
# adapter_config.json keys that do not change the layers PEFT builds.
IGNORED_CONFIG_KEYS = {"base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping",
                       "runtime_config"}


def config_signature(config: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in config.items() if k not in IGNORED_CONFIG_KEYS}, sort_keys=True,
                      default=str)


class AdapterSlots:
    """Adapters by public name -> slot; the caller serialises calls (the engine's weights lock)."""

    def __init__(self, base_model: torch.nn.Module) -> None:
        self.base_model = base_model
        self.model: Any = base_model  # a PeftModel after the first load
        self.loaded: OrderedDict[str, str] = OrderedDict()  # public name -> folder, oldest first
        self.slot_of: dict[str, str] = {}
        self._signature: dict[str, str] = {}  # slot -> config signature
        self._tensors: dict[str, dict[str, torch.Tensor]] = {}  # slot -> saved key -> live parameter
        self._free: list[str] = []
        self._created = 0
        self.version = 0  # bumped by every change of the adapters' weights (what per-row LoRA rebuilds from)

    def load(self, name: str, folder: Path, config: dict[str, Any]) -> None:
        from peft.utils import load_peft_weights

        signature = config_signature(config)
        previous = self.slot_of.get(name)
        slot = previous if previous is not None and self._signature[previous] == signature else None
        if slot is None:
            slot = next((s for s in self._free if self._signature[s] == signature), None)
        state = load_peft_weights(str(folder), device="cpu")
        if slot is not None and self._fits(slot, state):
            self._copy(slot, state)
            if slot in self._free:
                self._free.remove(slot)
        else:
            slot = self._inject(folder, signature)
        if previous is not None and previous != slot:
            self._release(previous)
        self.slot_of[name] = slot
        self.loaded.pop(name, None)
        self.loaded[name] = str(folder)
        self.version += 1

    def unload(self, name: str) -> None:
        del self.loaded[name]
        self._release(self.slot_of.pop(name))
        self.version += 1

    def base_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """The base model's own parameters under their plain transformers names, adapter slots left out."""
        markers = tuple(f".{slot}." for slot in self._signature)
        return [(name.replace(".base_layer.", ".").replace(".original_module.", "."), param)
                for name, param in self.base_model.named_parameters() if not any(m in name for m in markers)]

    def nbytes(self, name: str) -> int:
        """Memory the weights of adapter ``name`` take (its slot's tensors)."""
        return sum(t.numel() * t.element_size() for t in self._tensors[self.slot_of[name]].values())

    def _inject(self, folder: Path, signature: str) -> str:
        from peft import PeftModel

        slot = f"slot-{self._created}"
        self._created += 1
        if self.model is self.base_model:
            self.model = PeftModel.from_pretrained(self.base_model, folder, adapter_name=slot).eval()
        else:
            self.model.load_adapter(folder, adapter_name=slot)
        self._signature[slot] = signature
        marker = f".{slot}."
        self._tensors[slot] = {name.replace(marker, "."): param for name, param in self.model.named_parameters()
                               if marker in name}
        return slot

    def _fits(self, slot: str, state: dict[str, torch.Tensor]) -> bool:
        tensors = self._tensors[slot]
        return state.keys() == tensors.keys() and all(tensors[k].shape == v.shape for k, v in state.items())

    @torch.no_grad()
    def _copy(self, slot: str, state: dict[str, torch.Tensor]) -> None:
        tensors = self._tensors[slot]
        for key, value in state.items():
            tensors[key].copy_(value)

    def _release(self, slot: str) -> None:
        self._free.append(slot)
        while len(self._free) > FREE_SLOTS_KEPT:
            dropped = self._free.pop(0)
            self.model.delete_adapter(dropped)
            del self._signature[dropped], self._tensors[dropped]
