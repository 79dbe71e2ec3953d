"""Token-budget batches: micro-batches sized by how many tokens they hold, not by a row count.

With a fixed row count, a batch of short rows wastes the device and a batch of long rows may not fit it.
Here rows are sorted by length and cut greedily into batches whose padded size (rows x longest row) stays
within ``training.tokens_per_batch``: short rows travel many to a batch, long rows few. Because the cut
depends only on the multiset of lengths, every epoch has the same number of batches (the Trainer sizes
its schedule from it); what changes per epoch is which rows of equal length share a batch, and the order
of the batches.

The loss stays comparable across batches of different sizes because the SFT loss is a sum over trained
tokens divided by the Trainer's ``num_items_in_batch`` (the trained tokens of the whole optimizer step, on
every rank): a token weighs the same whichever micro-batch it fell into.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler


def token_budget_batches(lengths: Sequence[int], order: Sequence[int], budget: int) -> list[list[int]]:
    """Cut row indices ``order`` (ascending by length) into consecutive batches with
    ``len(batch) * longest row <= budget``; a row longer than the budget alone makes a batch of one."""
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index in order:
        length = lengths[index]
        if current and (len(current) + 1) * max(longest, length) > budget:
            batches.append(current)
            current, longest = [], 0
        current.append(index)
        longest = max(longest, length)
    if current:
        batches.append(current)
    return batches


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Yields lists of row indices, each a batch within the token budget; every row once per epoch.

    ``set_epoch`` (called by the Trainer each epoch) reseeds the shuffle, so runs are reproducible and a
    resumed run sees the same batches as an uninterrupted one.
    """

    def __init__(self, lengths: Sequence[int], budget: int, seed: int = 0) -> None:
        if budget <= 0:
            raise ValueError(f"token budget must be positive, got {budget}")
        self.lengths = [int(length) for length in lengths]
        self.budget = budget
        self.seed = seed
        self.epoch = 0
        # The batch count depends only on the sorted lengths: compute it once.
        self._count = len(token_budget_batches(self.lengths, self._sorted(list(range(len(self.lengths)))), budget))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _sorted(self, order: list[int]) -> list[int]:
        return sorted(order, key=self.lengths.__getitem__)  # stable: equal lengths keep the shuffled order

    def batches(self) -> list[list[int]]:
        """This epoch's batches, in the order they are yielded."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        shuffled = torch.randperm(len(self.lengths), generator=generator).tolist()
        batches = token_budget_batches(self.lengths, self._sorted(shuffled), self.budget)
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        if batches:
            # The batch with the longest rows goes first, so a budget too large for the device fails at once.
            largest = max(range(len(batches)), key=lambda i: max(self.lengths[j] for j in batches[i]))
            batches[0], batches[largest] = batches[largest], batches[0]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return self._count


def padding_fraction(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Share of the tokens in padded batches that are padding."""
    padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches if batch)
    real = sum(lengths[i] for batch in batches for i in batch)
    return 1 - real / padded if padded else 0.0


class TokenBudgetBatching:
    """Trainer mixin: with ``tokens_per_batch`` set, the training dataloader draws token-budget batches.

    ``row_lengths`` gives each prepared training row's token count (a trainer knows its own columns).
    Under several processes accelerate hands whole batches to the ranks in turn.
    """

    tokens_per_batch: int | None = None

    def row_lengths(self, dataset: Any) -> list[int]:
        raise NotImplementedError

    def get_train_dataloader(self) -> DataLoader:
        if self.tokens_per_batch is None:
            return super().get_train_dataloader()  # type: ignore[misc]
        from transformers.trainer_utils import seed_worker

        trainer: Any = self
        lengths = self.row_lengths(trainer.train_dataset)
        sampler = TokenBudgetBatchSampler(lengths, self.tokens_per_batch, seed=trainer.args.seed)
        dataset = trainer._remove_unused_columns(trainer.train_dataset, description="Training")
        args = trainer.args
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=trainer.data_collator,
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory,
            persistent_workers=args.dataloader_persistent_workers,
            prefetch_factor=args.dataloader_prefetch_factor,
            worker_init_fn=partial(seed_worker, num_workers=args.dataloader_num_workers, rank=args.process_index),
        )
        return trainer.accelerator.prepare(loader)
