"""posttrain's speed-ups keep the numbers: each fast path gives the plain path's loss and gradients."""

from __future__ import annotations

import contextlib

import pytest
import torch
from sft_trainers import build_sft_trainer

from posttrain.recipes.common import compile_decoder_layers


def loss_and_gradients(trainer, batch, autocast: bool = True) -> tuple[float, dict[str, torch.Tensor]]:
    trainer.model.zero_grad(set_to_none=True)
    with trainer.accelerator.autocast() if autocast else contextlib.nullcontext():
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
    eager = [loss_and_gradients(trainer, batch) for batch in batches]

    assert compile_decoder_layers(trainer.model) == trainer.model.config.num_hidden_layers
    compiled = [loss_and_gradients(trainer, batch) for batch in batches]

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


def head_outputs(trainer, batch, weights) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token log-probs and entropies of TRL's fused-head call, and the gradients of a weighted sum of the
    log-probs (GRPO weighs every token by its advantage)."""
    trainer.model.zero_grad(set_to_none=True)
    with trainer.accelerator.autocast():
        out = trainer.model(**batch, fused_lm_head=True)
    (out.log_probs * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.model.zero_grad(set_to_none=True)
    return out.log_probs.detach(), out.entropy.detach(), grads


def test_grpo_selected_head_gives_trl_log_probs_entropies_and_gradients(tmp_path):
    trainer = build_trainer_for(tmp_path, {"name": "grpo", "temperature": 0.7, "max_completion_length": 8},
                                {"type": "lora"}, "posttrain:gsm8k")
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, trainer.model.config.vocab_size, (3, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :4] = 0  # left padding, as GRPO batches it
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :6] = -100  # the prompt: only completion tokens are scored
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    weights = torch.randn(3, 11, generator=generator)

    head = trainer.model.get_base_model().forward
    assert "use_selected_log_probs" in head.__qualname__, "posttrain's head wraps TRL's on CPU"
    logps, entropy, grads = head_outputs(trainer, batch, weights)
    restore_trl_head(trainer, temperature=0.7, outputs=("log_probs", "entropy"))
    trl_logps, trl_entropy, trl_grads = head_outputs(trainer, batch, weights)

    torch.testing.assert_close(logps, trl_logps, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(entropy, trl_entropy, rtol=1e-3, atol=1e-3)
    assert (logps[:, :5] == 0).all(), "prompt positions carry no log-prob"
    assert_same_training_signal((0.0, grads), (0.0, trl_grads))


def test_grpo_rollouts_go_through_the_engine_with_trl_prompt_rendering(tmp_path):
    trainer = build_trainer_for(tmp_path, {"name": "grpo", "max_completion_length": 6}, {"type": "lora"},
                                "posttrain:gsm8k")
    assert trainer.rollout_func is not None
    prompts = [trainer.train_dataset[i]["prompt"] for i in (0, 0, 1, 1)]
    out = trainer.rollout_func(prompts, trainer)
    # TRL renders prompts in its private _tokenize_prompts; the engine must see exactly those tokens.
    assert out["prompt_ids"] == [list(ids) for ids in trainer._tokenize_prompts(prompts)[0]]
    assert len(out["completion_ids"]) == len(prompts)
    eos = set(trainer.eos_token_ids)
    for ids in out["completion_ids"]:
        assert 0 < len(ids) <= 6
        assert all(token not in eos for token in ids[:-1]), "a completion stops at its first EOS"
    # The copy it samples from is the policy: after a weight change, a refresh carries it over.
    rollouts = trainer.rollout_func
    probe = torch.tensor([out["prompt_ids"][0]])
    with torch.no_grad():
        before = rollouts.copy.model(input_ids=probe).logits[0, -1].float()
        for name, parameter in trainer.model.named_parameters():
            if "lora_B" in name:
                parameter.add_(0.05)
        theirs = trainer.model(input_ids=probe).logits[0, -1].float()
        ours = rollouts.copy.refresh()(input_ids=probe).logits[0, -1].float()
    assert float((theirs - before).norm() / theirs.norm()) > 0.1, "the change moves the policy"
    assert float((ours - theirs).norm() / theirs.norm()) < 2e-2  # the copy is bf16


def test_reward_trainer_picks_eager_attention_per_batch_with_sdpa_s_loss_and_gradients(tmp_path):
    trainer = build_trainer_for(tmp_path, {"name": "reward"}, {"type": "lora"}, "posttrain:preference")
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert trainer.cpu_attention is not None and model.config._attn_implementation == "sdpa"
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    eager = loss_and_gradients(trainer, batch)  # a small batch: its scores fit the budget, eager runs
    assert model.config._attn_implementation == "eager"

    trainer.cpu_attention = None
    model.set_attn_implementation("sdpa")
    sdpa = loss_and_gradients(trainer, batch)

    # Two kernels that round differently in bf16 (eager's softmax runs in fp32): the reward's loss is itself a
    # bf16 number (one ulp at 0.68 is 0.4%), and 5% of a gradient's norm, as for the compiled layers.
    assert_same_training_signal(eager, sdpa, loss_rtol=1e-2, grad_rtol=5e-2)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_reward_shared_prompt_rows_give_the_padded_rows_rewards_loss_and_gradients(tmp_path, attention):
    from trl.trainer.reward_trainer import DataCollatorForPreference

    from posttrain.recipes.shared_prompt import SharedPromptCollator

    trainer = build_trainer_for(tmp_path, {"name": "reward"}, {"type": "lora"}, "posttrain:preference")
    assert isinstance(trainer.data_collator, SharedPromptCollator)
    model = trainer.accelerator.unwrap_model(trainer.model)
    trainer.cpu_attention = None
    model.set_attn_implementation(attention)
    rows = [trainer.train_dataset[i] for i in range(4)]
    chosen = list(rows[0]["chosen_ids"])
    # The edge cases of one row per pair: rejected a prefix of chosen, and chosen a prefix of rejected.
    rows += [{"chosen_ids": chosen, "rejected_ids": chosen[:-3]}, {"chosen_ids": chosen[:-3], "rejected_ids": chosen}]
    shared = trainer.data_collator(rows)
    padded = DataCollatorForPreference(pad_token_id=trainer.data_collator.pad_token_id)(rows)
    assert shared["attention_mask"].sum() < padded["attention_mask"].sum(), "the prompts are computed once"

    def rewards(batch) -> torch.Tensor:
        return trainer.compute_loss(trainer.model, dict(batch), return_outputs=True)[1].logits.float()

    with torch.no_grad():  # fp32, no autocast: the same rewards to float rounding
        torch.testing.assert_close(rewards(shared), rewards(padded), rtol=1e-4, atol=1e-4)
    fp32 = [loss_and_gradients(trainer, batch, autocast=False) for batch in (shared, padded)]
    assert_same_training_signal(*fp32, loss_rtol=1e-5, grad_rtol=1e-4)
    # Under bf16 autocast the two layouts round in different places (5% of a gradient's norm, as for SDPA
    # against eager above).
    assert_same_training_signal(loss_and_gradients(trainer, shared), loss_and_gradients(trainer, padded),
                                loss_rtol=1e-2, grad_rtol=5e-2)


def test_reward_share_prompt_off_keeps_trl_s_two_padded_rows(tmp_path):
    from trl.trainer.reward_trainer import DataCollatorForPreference

    trainer = build_trainer_for(tmp_path, {"name": "reward", "share_prompt": False}, {"type": "lora"},
                                "posttrain:preference")
    assert isinstance(trainer.data_collator, DataCollatorForPreference)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    assert batch["input_ids"].shape[0] == 4 and "pair_mask" not in batch
    loss, grads = loss_and_gradients(trainer, batch)
    assert loss > 0 and grads
