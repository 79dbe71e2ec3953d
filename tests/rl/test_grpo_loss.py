"""The online GRPO objective on hand-built batches: advantages, masks, overrides, the PPO clip, the loss
types' token normalisation, and log-probs aligned with the tokens they score."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.rl.grpo.loss import LossConfig, StepCounts, policy_loss, token_logprobs
from posttrain.rl.grpo.rollouts import BadGroup, build_batch, group_advantages

PAD = 0


def batch_of(*groups, max_tokens=None):
    return build_batch(list(groups), PAD, max_tokens)


def leaf(values: list[list[float]]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, requires_grad=True)


def test_advantages_are_the_groups_z_scored_scores():
    assert group_advantages([1.0, 0.0, 0.0, 1.0]) == [1.0, -1.0, -1.0, 1.0]
    assert group_advantages([3.0, 3.0]) == [0.0, 0.0]  # nothing to prefer: no push either way
    z = group_advantages([2.0, 4.0, 9.0])
    assert sum(z) == pytest.approx(0) and sum(v * v for v in z) / 3 == pytest.approx(1)


def test_batch_shifts_tokens_and_honours_masks_overrides_logprobs_and_temperature():
    group = {
        "tokens": [[5, 6, 7, 8], [5, 6, 9, 10, 11]],
        "masks": [[-100, -100, 7, 8], [-100, -100, 9, 10, 11]],
        "scores": [1.0, 0.0],
        "overrides": [{}, {"set_advantage_to_zero": True}],
        "inference_logprobs": [[1.0, 1.0, -0.5, -0.7], [1.0, 1.0, -0.1, -0.2, -0.3]],
        "generation_params": {"temperature": 0.7},
    }
    batch = batch_of(group)
    assert batch.input_ids.tolist() == [[5, 6, 7, PAD], [5, 6, 9, 10]]
    assert batch.targets[0, :3].tolist() == [6, 7, 8] and batch.targets[1].tolist() == [6, 9, 10, 11]
    # Position t scores token t+1: the prompt token 6 is not trained, the completion is; padding never.
    assert batch.trained.tolist() == [[False, True, True, False], [False, True, True, True]]
    # z-scored [1, 0] -> [+1, -1]; the override zeroes the second sequence.
    assert batch.advantages[0, :3].tolist() == [1.0, 1.0, 1.0]
    assert batch.advantages[1].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert batch.old_logprobs[0, 1:3].tolist() == pytest.approx([-0.5, -0.7])
    assert batch.temperatures.tolist() == pytest.approx([0.7, 0.7])
    assert batch.num_trained_tokens == 5


def test_given_token_advantages_are_used_as_they_are():
    group = {"tokens": [[1, 2, 3]], "masks": [[-100, 2, 3]], "scores": [0.0],
             "advantages": [[0.0, 0.5, -2.0]], "overrides": [{"temperature": 2.0}]}
    batch = batch_of(group)
    assert batch.advantages.tolist() == [[0.5, -2.0]]
    assert batch.old_logprobs is None and batch.temperatures.tolist() == [2.0]


@pytest.mark.parametrize("bad, message", [
    ({"masks": [[-100, 2]]}, "3 tokens but 2 mask entries"),
    ({"scores": [1.0, 2.0]}, "1 token sequences, 1 masks and 2 scores"),
    ({"inference_logprobs": [[0.0]]}, "3 tokens but 1 inference_logprobs"),
    ({"tokens": [[1]], "masks": [[1]]}, "needs a prompt and a completion"),
])
def test_a_group_that_does_not_fit_together_is_named(bad, message):
    group = {"tokens": [[1, 2, 3]], "masks": [[-100, 2, 3]], "scores": [1.0], **bad}
    with pytest.raises(BadGroup, match=message):
        batch_of({"tokens": [[4, 5]], "masks": [[-100, 5]], "scores": [0.0]}, group)


def two_sequence_batch(old_logprobs: list[list[float]] | None = None):
    """Sequence 0 scores 1, sequence 1 scores 0: advantages +1 / -1 on their completion tokens."""
    logprobs = None if old_logprobs is None else [[1.0, 1.0, *row] for row in old_logprobs]
    group = {"tokens": [[1, 2, 3, 4], [1, 2, 5, 6]], "masks": [[-100, -100, 3, 4], [-100, -100, 5, 6]],
             "scores": [1.0, 0.0]}
    if logprobs is not None:
        group["inference_logprobs"] = logprobs
    return batch_of(group)


def test_gradient_raises_high_advantage_tokens_lowers_low_ones_and_ignores_masked_ones():
    batch = two_sequence_batch()
    logprobs = leaf([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    loss, stats = policy_loss(logprobs, batch, LossConfig(), StepCounts(2, batch.num_trained_tokens))
    loss.backward()
    grad = logprobs.grad
    # Gradient descent moves log-probs against the gradient: up for advantage +1, down for -1.
    assert (grad[0, 1:] < 0).all() and (grad[1, 1:] > 0).all()
    assert grad[:, 0].abs().sum() == 0  # position 0 predicts a prompt token: not trained
    assert stats.means()["mean_ratio"] == pytest.approx(1.0) and stats.clipped == 0
    assert loss.item() == pytest.approx(0.0)  # advantages sum to zero at ratio 1


def test_set_advantage_to_zero_trains_nothing_on_that_sequence():
    group = {"tokens": [[1, 2, 3], [1, 2, 4]], "masks": [[-100, 2, 3], [-100, 2, 4]], "scores": [1.0, 0.0],
             "overrides": [{"set_advantage_to_zero": True}, {}]}
    batch = batch_of(group)
    logprobs = leaf([[-1.0, -1.0], [-1.0, -1.0]])
    loss, _ = policy_loss(logprobs, batch, LossConfig(), StepCounts(2, batch.num_trained_tokens))
    loss.backward()
    assert logprobs.grad[0].abs().sum() == 0 and (logprobs.grad[1] > 0).all()


def test_ppo_clip_stops_the_push_beyond_the_trust_region():
    # Current log-probs -1 everywhere. Old log-probs chosen so ratio = e^0.5 (~1.65 > 1.2) on the first
    # completion token and e^-0.5 (~0.61 < 0.8) on the second, for both sequences.
    batch = two_sequence_batch(old_logprobs=[[-1.5, -0.5], [-1.5, -0.5]])
    logprobs = leaf([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    loss, stats = policy_loss(logprobs, batch, LossConfig(clip_low=0.2, clip_high=0.2),
                              StepCounts(2, batch.num_trained_tokens))
    loss.backward()
    grad = logprobs.grad
    # A > 0, ratio above 1 + eps: already pushed up enough, clipped -> no gradient.
    assert grad[0, 1] == 0
    # A > 0, ratio below 1 - eps: the pessimistic bound keeps the unclipped term -> still pushed up.
    assert grad[0, 2] < 0
    # A < 0, ratio above 1 + eps: unclipped (the worse term) -> pushed down.
    assert grad[1, 1] > 0
    # A < 0, ratio below 1 - eps: already pushed down enough -> no gradient.
    assert grad[1, 2] == 0
    assert stats.clipped == 4 and stats.tokens == 4
    means = stats.means()
    assert means["clipped_fraction"] == 1.0
    assert means["mean_ratio"] == pytest.approx((math.exp(0.5) + math.exp(-0.5)) / 2, rel=1e-5)


def test_asymmetric_clip_high_widens_the_upper_bound_only():
    batch = two_sequence_batch(old_logprobs=[[-1.2, -0.5], [-1.2, -0.5]])  # ratios e^0.2 ~ 1.22, e^-0.5
    _, stats = policy_loss(leaf([[-1.0] * 3, [-1.0] * 3]), batch, LossConfig(clip_low=0.2, clip_high=0.28),
                           StepCounts(2, batch.num_trained_tokens))
    assert stats.clipped == 2  # only the e^-0.5 tokens lie outside [0.8, 1.28]; e^0.2 only beyond 1.2
    _, symmetric = policy_loss(leaf([[-1.0] * 3, [-1.0] * 3]), batch, LossConfig(clip_low=0.2, clip_high=0.2),
                               StepCounts(2, batch.num_trained_tokens))
    assert symmetric.clipped == 4


def test_loss_types_normalise_tokens_differently():
    # Sequence 0: one trained token, advantage 2; sequence 1: three trained tokens, advantage 1 (given).
    group = {"tokens": [[1, 2, 0, 0], [1, 2, 3, 4]], "masks": [[-100, 2, -100, -100], [-100, 2, 3, 4]],
             "scores": [0.0, 0.0], "advantages": [[2.0] * 4, [1.0] * 4]}
    batch = batch_of(group)
    counts = StepCounts(2, batch.num_trained_tokens)
    values = {}
    for loss_type in ("grpo", "dr_grpo", "dapo"):
        loss, _ = policy_loss(leaf([[-1.0] * 3, [-1.0] * 3]), batch, LossConfig(loss_type=loss_type,
                                                                               token_budget=4), counts)
        values[loss_type] = loss.item()
    assert values["grpo"] == pytest.approx(-(2 + 1) / 2)  # per-sequence means, then their mean
    assert values["dapo"] == pytest.approx(-(2 + 3) / 4)  # every token alike
    assert values["dr_grpo"] == pytest.approx(-(2 + 3) / (2 * 4))  # constant budget per sequence


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_micro_batches_add_up_to_the_whole_batch(loss_type):
    batch = two_sequence_batch(old_logprobs=[[-1.1, -0.9], [-1.3, -0.8]])
    counts = StepCounts(2, batch.num_trained_tokens)
    values = [[-1.0, -0.7, -1.2], [-0.9, -1.1, -1.0]]
    config = LossConfig(loss_type=loss_type, beta=0.1)
    ref = torch.full((2, 3), -1.05)
    whole, _ = policy_loss(leaf(values), batch, config, counts, ref)
    parts = sum(policy_loss(leaf(values[i:i + 1]), batch.rows(i, i + 1), config, counts, ref[i:i + 1])[0]
                for i in range(2))
    assert float(parts) == pytest.approx(float(whole), rel=1e-6)


def test_kl_term_is_zero_at_the_reference_and_positive_away_from_it():
    batch = two_sequence_batch()
    logprobs = [[-1.0] * 3, [-1.0] * 3]
    config = LossConfig(beta=0.5)
    counts = StepCounts(2, batch.num_trained_tokens)
    at_ref, stats = policy_loss(leaf(logprobs), batch, config, counts, torch.full((2, 3), -1.0))
    away, away_stats = policy_loss(leaf(logprobs), batch, config, counts, torch.full((2, 3), -2.0))
    assert stats.means()["kl"] == pytest.approx(0.0)
    expected = math.exp(-1.0) + 1.0 - 1  # k3 with ref - logp = -1
    assert away_stats.means()["kl"] == pytest.approx(expected, rel=1e-5)
    assert away.item() - at_ref.item() == pytest.approx(0.5 * expected, rel=1e-5)
    with pytest.raises(ValueError, match="reference"):
        policy_loss(leaf(logprobs), batch, config, counts, None)


def test_token_logprobs_score_each_target_with_the_previous_positions(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    group = {"tokens": [[11, 12, 13, 14, 15], [11, 12, 16]], "masks": [[-100, -100, 13, 14, 15], [-100, -100, 16]],
             "scores": [1.0, 0.0], "generation_params": {"temperature": 0.5}}
    batch = batch_of(group)
    with torch.no_grad():
        got = token_logprobs(model, batch)
        logits = model(torch.tensor([[11, 12, 13, 14]])).logits[0] / 0.5
    expected = logits.log_softmax(-1)[torch.arange(4), torch.tensor([12, 13, 14, 15])]
    assert got[0, 1:].tolist() == pytest.approx(expected[1:].tolist(), abs=1e-5)
    assert got[0, 0] == 0 and got[1, 2:].abs().sum() == 0  # untrained and padded positions stay 0


@pytest.mark.parametrize("bad, message", [
    ({"scores": [None]}, "scores must be a list of finite numbers"),
    ({"scores": ["x"]}, "scores must be a list of finite numbers"),
    ({"scores": [float("nan")]}, "scores must be a list of finite numbers"),
    ({"scores": [float("inf")]}, "scores must be a list of finite numbers"),
    ({"advantages": 5}, "advantages must be a list"),
    ({"advantages": [[0.0, float("nan"), 1.0]]}, "advantages must be a list of finite numbers"),
    ({"inference_logprobs": [[None, 0.0, 0.0]]}, "inference_logprobs must be a list of finite numbers"),
    ({"tokens": [[1, "2", 3]]}, "tokens must be a list of integer token ids"),
    ({"tokens": [[1, 2, 99]]}, "token id 99 is outside the vocabulary"),
    ({"tokens": [[1, 2, -5]]}, "token id -5 is outside the vocabulary"),
    ({"masks": [[-100, 2, 77]]}, "masks: token id 77 is outside the vocabulary"),
    ({"overrides": [{"temperature": "hot"}]}, "temperature must be a finite number"),
    ({"overrides": ["zero"]}, "overrides\\[0\\] must be an object"),
    ({"generation_params": {"temperature": None}}, None),  # absent temperature: fine
])
def test_a_group_with_bad_values_is_a_bad_group_not_a_crash(bad, message):
    """Whatever an environment sends, the trainer gets a BadGroup (skipped) or a finite batch."""
    group = {"tokens": [[1, 2, 3]], "masks": [[-100, 2, 3]], "scores": [1.0], **bad}
    if message is None:
        batch = build_batch([group], PAD, vocab_size=10)
        assert torch.isfinite(batch.advantages).all()
        return
    with pytest.raises(BadGroup, match=message):
        build_batch([group], PAD, vocab_size=10)
