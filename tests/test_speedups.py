"""posttrain's speed-ups keep the numbers: each fast path gives the plain path's loss and gradients."""

from __future__ import annotations

import torch
from sft_trainers import build_sft_trainer

from posttrain.recipes.common import compile_decoder_layers


def sft_loss_and_gradients(trainer, batch) -> tuple[float, dict[str, torch.Tensor]]:
    trainer.model.zero_grad(set_to_none=True)
    with trainer.accelerator.autocast():
        loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.model.zero_grad(set_to_none=True)
    return loss.item(), grads


def test_compiled_decoder_layers_give_the_eager_loss_and_gradients(tmp_path):
    trainer = build_sft_trainer(tmp_path, {"type": "lora", "r": 8, "alpha": 16})
    rows = sorted((trainer.train_dataset[i] for i in range(8)), key=lambda row: len(row["input_ids"]))
    # Two lengths: one compiled graph (dynamic in the sequence length) serves both.
    batches = [trainer.data_collator(rows[:3]), trainer.data_collator(rows[-3:])]
    assert batches[0]["input_ids"].shape[1] != batches[1]["input_ids"].shape[1]
    eager = [sft_loss_and_gradients(trainer, batch) for batch in batches]

    assert compile_decoder_layers(trainer.model) == trainer.model.config.num_hidden_layers
    compiled = [sft_loss_and_gradients(trainer, batch) for batch in batches]

    for (eager_loss, eager_grads), (loss, grads) in zip(eager, compiled, strict=True):
        # bf16 autocast on CPUs that have it: the fused kernels round in other places than eager ones.
        assert abs(loss - eager_loss) <= 1e-2 * abs(eager_loss)
        assert set(grads) == set(eager_grads) and grads
        for name, grad in eager_grads.items():
            relative = (grads[name] - grad).norm() / grad.norm().clamp(min=1e-12)
            assert relative < 5e-2, (name, float(relative))
    state = trainer.model.state_dict()
    assert not any("_orig_mod" in key for key in state), "compiling in place keeps the parameter names"
