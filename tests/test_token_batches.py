"""Token-budget batching: the sampler's contract, and a per-token loss that ignores how rows were split."""

from __future__ import annotations

import json
import random

import pytest
import torch

from posttrain.errors import ConfigError
from posttrain.spec import spec_from_dict
from posttrain.token_batches import TokenBudgetBatchSampler, padding_fraction, token_budget_batches


def random_lengths(count: int = 300, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(3, 200) for _ in range(count)]


@pytest.mark.parametrize("budget", [200, 512, 4096])
def test_batches_stay_within_the_budget_and_cover_every_row_once(budget):
    lengths = random_lengths()
    sampler = TokenBudgetBatchSampler(lengths, budget, seed=3)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        for batch in batches:
            assert len(batch) * max(lengths[i] for i in batch) <= budget
        rows = sorted(i for batch in batches for i in batch)
        assert rows == list(range(len(lengths)))


def test_batches_fill_the_budget_rather_than_a_row_count():
    lengths = [10] * 40 + [100] * 4
    batches = token_budget_batches(lengths, sorted(range(len(lengths)), key=lengths.__getitem__), 400)
    assert sorted(len(batch) for batch in batches) == [4, 40]  # 40 short rows in one batch, 4 long in another


def test_a_row_longer_than_the_budget_travels_alone():
    assert token_budget_batches([5, 50, 5], [0, 2, 1], 20) == [[0, 2], [1]]


def test_epochs_reshuffle_reproducibly_and_the_longest_rows_come_first():
    lengths = random_lengths()
    first, again, other = (TokenBudgetBatchSampler(lengths, 1024, seed=7) for _ in range(3))
    other.set_epoch(1)
    assert list(first) == list(again)
    assert list(first) != list(other)
    assert max(lengths[i] for i in next(iter(first))) == max(lengths)


def test_length_grouping_cuts_padding_against_a_random_fixed_batch():
    lengths = random_lengths(count=400)
    budgeted = list(TokenBudgetBatchSampler(lengths, 1600, seed=0))
    rows = list(range(len(lengths)))
    random.Random(0).shuffle(rows)
    fixed = [rows[i:i + 8] for i in range(0, len(rows), 8)]
    assert padding_fraction(budgeted, lengths) < 0.1 < padding_fraction(fixed, lengths)


def test_spec_refuses_a_budget_below_one_full_row():
    with pytest.raises(ConfigError, match=r"tokens_per_batch \(100\) is below max_seq_length"):
        spec_from_dict({"training": {"tokens_per_batch": 100, "max_seq_length": 512}})


def test_dpo_refuses_token_budgets_clearly():
    from posttrain.preflight import check_options

    spec = spec_from_dict({"method": "dpo", "training": {"tokens_per_batch": 2048, "max_seq_length": 512},
                           "tracking": {"report_to": []}})
    with pytest.raises(ConfigError, match=r"training\.tokens_per_batch: token-budget batches are implemented for sft"):
        check_options(spec, [])


@pytest.fixture(scope="module")
def sft_trainer(tmp_path_factory):
    """A real PosttrainSFTTrainer on the tiny model, with a token budget, built by the SFT recipe."""
    from posttrain.data import load_training_data
    from posttrain.job.directory import JobDir
    from posttrain.job.signals import StopRequest
    from posttrain.modeling import load_tokenizer, resolve_placement
    from posttrain.recipes import RecipeInputs, build_trainer

    spec = spec_from_dict({"model": {"name_or_path": "posttrain:tiny"}, "peft": {"type": "none"},
                           "data": {"source": "posttrain:alpaca"}, "tracking": {"report_to": []},
                           "training": {"tokens_per_batch": 1024, "max_seq_length": 256, "max_steps": 2}})
    assert StopRequest  # the worker's own imports, so the recipe sees what a run sees
    job_dir = JobDir(tmp_path_factory.mktemp("budget")).create()
    data = load_training_data(spec.data, "sft", seed=0)
    inputs = RecipeInputs(spec, job_dir, resolve_placement(spec.model), data, load_tokenizer(spec), [])
    return build_trainer(inputs)


def test_the_sft_trainer_draws_token_budget_batches(sft_trainer):
    loader = sft_trainer.get_train_dataloader()
    lengths = sft_trainer.row_lengths(sft_trainer.train_dataset)
    sizes = []
    for batch in loader:
        rows, width = batch["input_ids"].shape
        assert rows * width <= 1024
        sizes.append(rows)
    assert len(set(sizes)) > 1  # the row count follows the lengths
    assert sum(sizes) == len(lengths)


def _step(trainer, batches, num_items):
    """Loss and gradients of one optimizer step made of ``batches`` (the Trainer's accumulation)."""
    model = trainer.model
    model.train()
    model.zero_grad()
    total = 0.0
    for batch in batches:
        loss = trainer.compute_loss(model, batch, num_items_in_batch=num_items)
        loss.backward()
        total += loss.item()
    return total, [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("fused_loss", [True, False], ids=["posttrain-loss", "trl-loss"])
def test_per_token_loss_does_not_depend_on_how_rows_are_split(sft_trainer, fused_loss, monkeypatch):
    # The Trainer passes num_items_in_batch (trained tokens of the whole step) only to models that take
    # loss kwargs: the property the per-token normalisation rests on.
    assert sft_trainer.model_accepts_loss_kwargs
    monkeypatch.setattr(sft_trainer, "fused_loss", fused_loss)  # CPU runs use ours; GPU runs TRL's
    rows = [sft_trainer.train_dataset[i] for i in range(6)]
    collate = sft_trainer.data_collator
    whole = collate(rows)
    num_items = int((whole["labels"][:, 1:] != -100).sum())
    reference, reference_grads = _step(sft_trainer, [whole], num_items)
    for split in ([1, 5], [2, 2, 2], [3, 1, 1, 1]):
        parts, start = [], 0
        for size in split:
            parts.append(collate(rows[start:start + size]))
            start += size
        loss, grads = _step(sft_trainer, parts, num_items)
        assert loss == pytest.approx(reference, rel=1e-5)
        for ours, theirs in zip(grads, reference_grads, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
        # A mean of per-batch means (what a row-count batch without num_items would give) differs.
        naive = sum(sft_trainer.compute_loss(sft_trainer.model, part).item() for part in parts) / len(parts)
        assert naive != pytest.approx(reference, rel=1e-3)


def test_a_resumed_run_trains_on_the_batches_it_would_have_seen(tmp_path):
    import shutil

    from posttrain.worker import run_worker

    spec = spec_from_dict({"model": {"name_or_path": "posttrain:tiny"}, "peft": {"type": "none"},
                           "data": {"source": "posttrain:alpaca"}, "tracking": {"report_to": []},
                           "training": {"max_steps": 3, "save_steps": 2, "tokens_per_batch": 1024,
                                        "max_seq_length": 256}})

    def losses() -> dict[int, float]:
        lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
        return {rec["step"]: rec["loss"] for rec in map(json.loads, lines) if "loss" in rec}

    assert run_worker(spec, tmp_path, log_to_file=False).state == "succeeded"
    uninterrupted = losses()
    # As if the run had died after its step-2 checkpoint.
    shutil.rmtree(tmp_path / "checkpoints" / "checkpoint-3")
    shutil.rmtree(tmp_path / "final")
    assert run_worker(spec, tmp_path, resume=True, log_to_file=False).state == "succeeded"
    assert losses()[3] == pytest.approx(uninterrupted[3], rel=1e-6)
