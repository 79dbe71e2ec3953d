"""posttrain's speed-ups keep the numbers: each fast path gives the plain path's loss and gradients."""

from __future__ import annotations

import pytest
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


def build_trainer_for(tmp_path, method: dict, peft: dict, data: str, **training):
    from posttrain.data import load_training_data
    from posttrain.job.directory import JobDir
    from posttrain.modeling import load_tokenizer, resolve_placement
    from posttrain.recipes import RecipeInputs, build_trainer
    from posttrain.spec import spec_from_dict

    torch.set_num_threads(1)
    spec = spec_from_dict({"method": method, "peft": peft, "data": {"source": data}, "tracking": {"report_to": []},
                           "training": {"max_steps": 1, "per_device_train_batch_size": 4, **training}})
    data_ = load_training_data(spec.data, spec.method.name, seed=spec.training.seed)
    inputs = RecipeInputs(spec, JobDir(tmp_path).create(), resolve_placement(spec.model), data_,
                          load_tokenizer(spec), [])
    trainer = build_trainer(inputs)
    trainer.model.train()
    return trainer


def restore_trl_head(trainer, **head) -> None:
    """Put TRL's own fused LM head back where posttrain's selected-positions head wrapped it."""
    from trl.trainer.utils import add_fused_lm_head

    base = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    del base.forward
    add_fused_lm_head(base, **head)


def loss_and_gradients(trainer, batch) -> tuple[float, dict[str, torch.Tensor]]:
    trainer.model.zero_grad(set_to_none=True)
    with trainer.accelerator.autocast():
        loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.model.zero_grad(set_to_none=True)
    return loss.item(), grads


def assert_same_training_signal(ours, trl, loss_rtol: float = 1e-3, grad_rtol: float = 2e-2) -> None:
    """Equal within bf16 rounding (the tiny model trains under bf16 autocast on CPUs that have it): the loss
    to 0.1%, each parameter's gradient to 2% of its norm (bf16 keeps 8 bits of mantissa: 0.4% per rounding)."""
    (our_loss, our_grads), (trl_loss, trl_grads) = ours, trl
    assert abs(our_loss - trl_loss) <= loss_rtol * max(1.0, abs(trl_loss))
    assert set(our_grads) == set(trl_grads) and trl_grads
    for name, grad in trl_grads.items():
        relative = float((our_grads[name] - grad).norm() / grad.norm().clamp(min=1e-12))
        assert relative < grad_rtol, (name, relative)


@pytest.mark.parametrize("peft", [{"type": "lora"}, {"type": "none"}], ids=["lora", "full"])
def test_dpo_selected_head_gives_trl_loss_gradients_and_reference_log_probs(tmp_path, peft):
    # One epoch: every row is trained on, so the reference log-probs are computed once up front.
    trainer = build_trainer_for(tmp_path, {"name": "dpo"}, peft, "posttrain:preference", max_steps=-1)
    assert trainer.selected_head_applied and trainer.args.precompute_ref_log_probs
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    ours = loss_and_gradients(trainer, batch)
    our_reference = trainer.compute_ref_log_probs(trainer.model, dict(batch))

    restore_trl_head(trainer, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    trl = loss_and_gradients(trainer, batch)
    trl_reference = trainer.compute_ref_log_probs(trainer.model, dict(batch))

    assert_same_training_signal(ours, trl)
    for mine, theirs in zip(our_reference, trl_reference, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    # The cached reference log-probs (computed by posttrain's head before training) are the reference's.
    cached = torch.tensor([trainer.train_dataset[i]["ref_chosen_logps"] for i in range(4)])
    torch.testing.assert_close(cached, trl_reference[0].float(), rtol=1e-4, atol=1e-4)
