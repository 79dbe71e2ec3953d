"""The KV cache of a running batch whose rows come and go: one preallocated buffer per layer, rows that
share a column window, written in place.

transformers' DynamicCache concatenates at every step (the whole cache is copied per token) and cannot
take in a row or let one go without copying every other row. Here each layer's keys and values live in
``[rows, heads, columns, head_dim]`` buffers that grow geometrically. All rows write the same column at
a decode step; a row that joins has its prompt's keys placed so that it ends at the current column
(left padding, masked), and a row that finishes leaves a hole that the next row to join fills. The
attention mask (additive, so eager and SDPA attention both take it as it is) keeps each row to its own
columns, and positions are per row, so where a row sits in the buffer never changes its result.

transformers' ``Cache`` API is used as documented for custom caches (a list of ``CacheLayerMixin`` layers
whose ``update`` returns the keys and values to attend over); ``tests/rl/test_inference_server.py``
checks that a batch generates exactly what each prompt generates alone, which fails loudly if a
transformers upgrade changes how models call the cache.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

MIN_COLUMNS = 64
MIN_ROWS = 4


def _grown(size: int, needed: int, minimum: int) -> int:
    size = max(size, minimum)
    while size < needed:
        size *= 2
    return size


class WindowLayer(DynamicLayer):
    """One layer's buffers; :class:`KVWindow` decides where an update writes."""

    def __init__(self, window: KVWindow) -> None:
        super().__init__()
        self.window = window
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        window = self.window
        if self.key_buffer is None:
            self.dtype, self.device = key_states.dtype, key_states.device
            self.is_initialized = True
            self.resize(window.row_capacity, window.column_capacity, key_states)
        rows, width = key_states.shape[0], key_states.shape[2]
        end = window.end
        self.key_buffer[:rows, :, end:end + width] = key_states
        self.value_buffer[:rows, :, end:end + width] = value_states
        self.keys = self.key_buffer[:rows, :, window.start:end + width]
        self.values = self.value_buffer[:rows, :, window.start:end + width]
        return self.keys, self.values

    def resize(self, rows: int, columns: int, like: torch.Tensor | None = None) -> None:
        """Make room for ``rows`` x ``columns`` (never smaller), keeping what is stored."""
        old_keys, old_values = self.key_buffer, self.value_buffer
        if like is None:
            if old_keys is None:
                return  # allocated on the first update, when heads and dtype are known
            like = old_keys
        shape = (rows, like.shape[1], columns, like.shape[3])
        self.key_buffer = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.value_buffer = torch.zeros(shape, dtype=like.dtype, device=like.device)
        if old_keys is not None and old_values is not None:
            kept_rows, kept_columns = min(rows, old_keys.shape[0]), min(columns, old_keys.shape[2])
            self.key_buffer[:kept_rows, :, :kept_columns] = old_keys[:kept_rows, :, :kept_columns]
            self.value_buffer[:kept_rows, :, :kept_columns] = old_values[:kept_rows, :, :kept_columns]

    def get_seq_length(self) -> int:
        return self.window.end - self.window.start

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.window.end - self.window.start + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("a KVWindow's rows are managed by the window, not by index selection")


class KVWindow(Cache):
    """Rows ``0..rows-1`` of every layer attend over columns ``start..end-1`` (plus what a forward adds)."""

    def __init__(self, device: torch.device | str) -> None:
        super().__init__(layers=[])
        self.layers: list[WindowLayer] = []  # one per attention layer, made by the first prompt placed
        self.device = torch.device(device)
        self.rows = 0  # rows a forward runs over (holes included)
        self.start = 0
        self.end = 0
        self.row_capacity = MIN_ROWS
        self.column_capacity = MIN_COLUMNS
        # valid[r, c]: row r holds a real token at column c.
        self.valid = torch.zeros((self.row_capacity, self.column_capacity), dtype=torch.bool, device=self.device)
        self.row_start = [0] * self.row_capacity  # first column of each row's tokens

    @property
    def is_compileable(self) -> bool:
        return False

    # -- room -------------------------------------------------------------------------------------------------
    def reserve(self, rows: int, columns: int) -> None:
        """Room for ``rows`` rows and columns up to ``columns`` (exclusive)."""
        if rows <= self.row_capacity and columns <= self.column_capacity:
            return
        new_rows = _grown(self.row_capacity, rows, MIN_ROWS)
        new_columns = _grown(self.column_capacity, columns, MIN_COLUMNS)
        for layer in self.layers:
            layer.resize(new_rows, new_columns)
        valid = torch.zeros((new_rows, new_columns), dtype=torch.bool, device=self.device)
        valid[:self.row_capacity, :self.column_capacity] = self.valid
        self.valid = valid
        self.row_start += [0] * (new_rows - self.row_capacity)
        self.row_capacity, self.column_capacity = new_rows, new_columns

    def shift(self, offset: int) -> None:
        """Move every stored column by ``offset`` (left when negative), rows ``0..rows-1``."""
        if offset == 0:
            return
        self.reserve(self.rows, self.end + max(offset, 0))
        source = slice(self.start, self.end)
        target = slice(self.start + offset, self.end + offset)
        for layer in self.layers:
            if layer.key_buffer is not None and layer.value_buffer is not None:
                layer.key_buffer[:self.rows, :, target] = layer.key_buffer[:self.rows, :, source].clone()
                layer.value_buffer[:self.rows, :, target] = layer.value_buffer[:self.rows, :, source].clone()
        valid = self.valid[:self.rows, source].clone()
        self.valid[:self.rows] = False
        self.valid[:self.rows, target] = valid
        self.row_start = [s + offset for s in self.row_start]
        self.start += offset
        self.end += offset

    # -- rows -------------------------------------------------------------------------------------------------
    def place(self, row: int, keys: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> None:
        """Put one row's prompt (``length`` real tokens: the last ``length`` columns of each layer's
        ``[heads, columns, head_dim]`` keys and values) so that it ends at column ``end``. Call
        :meth:`trim` once the rows have been placed."""
        empty = self.rows == 0
        if length > self.end:
            self.shift(length - self.end)
        self.reserve(max(self.rows, row + 1), self.end + 1)
        begin = self.end - length
        while len(self.layers) < len(keys):
            self.layers.append(WindowLayer(self))
        for layer, (key, value) in zip(self.layers, keys, strict=True):
            if layer.key_buffer is None:
                layer.dtype, layer.device, layer.is_initialized = key.dtype, key.device, True
                layer.resize(self.row_capacity, self.column_capacity, key[None])
            assert layer.key_buffer is not None and layer.value_buffer is not None
            layer.key_buffer[row, :, begin:self.end] = key[:, key.shape[1] - length:]
            layer.value_buffer[row, :, begin:self.end] = value[:, value.shape[1] - length:]
        self.valid[row] = False
        self.valid[row, begin:self.end] = True
        self.row_start[row] = begin
        self.rows = max(self.rows, row + 1)
        self.start = begin if empty else min(self.start, begin)

    def free(self, row: int) -> None:
        """Row ``row`` is done; call :meth:`trim` after."""
        self.valid[row] = False

    def trim(self, active: list[int]) -> None:
        """Forwards run over rows up to the last active one and columns from the first one an active row
        uses; an empty window starts again at column 0."""
        if not active:
            self.rows, self.start, self.end = 0, 0, 0
            if self.row_capacity > MIN_ROWS or self.column_capacity > MIN_COLUMNS:
                self._release_memory()
            return
        self.rows = max(active) + 1
        self.start = min(self.row_start[r] for r in active)

    def _release_memory(self) -> None:
        """An empty window gives back what a burst made it grow to (the next prompt allocates again)."""
        for layer in self.layers:
            layer.key_buffer = layer.value_buffer = layer.keys = layer.values = None
        self.row_capacity, self.column_capacity = MIN_ROWS, MIN_COLUMNS
        self.valid = torch.zeros((MIN_ROWS, MIN_COLUMNS), dtype=torch.bool, device=self.device)
        self.row_start = [0] * MIN_ROWS

    def move(self, source: int, target: int) -> None:
        """Copy row ``source`` into the free row ``target`` (to close a hole); call :meth:`trim` after."""
        columns = slice(self.start, self.end)
        for layer in self.layers:
            if layer.key_buffer is not None and layer.value_buffer is not None:
                layer.key_buffer[target, :, columns] = layer.key_buffer[source, :, columns]
                layer.value_buffer[target, :, columns] = layer.value_buffer[source, :, columns]
        self.valid[target] = self.valid[source]
        self.valid[source] = False
        self.row_start[target] = self.row_start[source]

    # -- a decode step ----------------------------------------------------------------------------------------
    def step_mask(self, dtype: torch.dtype, active: list[int]) -> torch.Tensor:
        """The additive mask of a one-token step over rows ``0..rows-1``: each active row sees its own
        columns and the one being written; a hole sees only that column (its output is ignored)."""
        if self.end + 1 > self.column_capacity:
            if self.start > self.column_capacity // 4:
                self.shift(-self.start)
            self.reserve(self.rows, self.end + 1)
        self.valid[:self.rows, self.end] = True
        visible = self.valid[:self.rows, self.start:self.end + 1]
        mask = torch.zeros(visible.shape, dtype=dtype, device=self.device)
        mask.masked_fill_(~visible, torch.finfo(dtype).min)
        return mask[:, None, None, :]

    def advance(self, active: list[int]) -> None:
        """After a step: the column just written belongs to the active rows only."""
        alive = set(active)
        holes = [r for r in range(self.rows) if r not in alive]
        if holes:
            self.valid[holes, self.end] = False
        self.end += 1
