"""Next-token loss computed only where labels are trained, without materialising the logits.

For a 49K-token vocabulary the LM head and its cross-entropy dominate a CPU training step of a small model:
the logits of a batch of 8 x 512 tokens are 800 MB in fp32. TRL's SFT loss avoids materialising them with a
tiled LM head, but on CPU it scores every position (prompt and padding included), and its backward recomputes
the projection. Here only the positions whose next-token label is trained are projected, in row chunks, and
each chunk's gradients (softmax minus one-hot) are folded into the hidden-state and head-weight gradients
during the forward pass, so the head is projected once and the backward only scales the stored gradients.
The matmuls run in the autocast dtype (bf16 where the CPU has it); the softmax and the loss stay in fp32.
"""

from __future__ import annotations

import torch

# Logits (fp32) projected at a time: 170 rows of a 49K vocabulary. Chunks that stay in the CPU's cache make
# the softmax passes cheap: 128-256 rows were ~15% faster than 1,024 rows (200 MB) on SmolLM2's head, and 32
# rows slower again (the matmuls get too thin).
CHUNK_BYTES = 32 << 20
# Largest relative error (L2 over a row of logits) at which a model's head counts as a plain projection.
PLAIN_HEAD_RELATIVE_ERROR = 1e-2


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets``, and the count of top-1 hits."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                compute_dtype: torch.dtype, need_grad: bool):
        rows = max(64, CHUNK_BYTES // (weight.shape[0] * 4))
        w = weight.to(compute_dtype)
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_grad else None
        grad_weight = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                       if need_grad and ctx.needs_input_grad[1] else None)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            h = hidden[start:start + rows].to(compute_dtype)
            t = targets[start:start + rows]
            logits = (h @ w.t()).float()
            # One max pass gives the top-1 prediction and softmax's shift; the log-normaliser comes from the
            # softmax at the prediction (at least 1 / vocab, so its log is exact), which saves logsumexp's
            # extra pass over the chunk (measured ~20% of the loss's non-matmul time).
            top, predicted = logits.max(dim=-1)
            target_logits = logits.gather(1, t[:, None]).squeeze(1)
            probs = torch.softmax(logits, dim=-1)
            del logits
            log_norm = top - probs.gather(1, predicted[:, None]).squeeze(1).log()
            loss += (log_norm - target_logits).sum()
            correct += (predicted == t).sum()
            if grad_hidden is None:
                continue
            # d(sum of losses)/d(logits) = softmax - one_hot(target), built in place in the softmax buffer.
            probs[torch.arange(t.shape[0], device=t.device), t] -= 1
            g = probs.to(compute_dtype)
            grad_hidden[start:start + rows] = g @ w
            if grad_weight is not None:
                grad_weight += g.t() @ h
        ctx.mark_non_differentiable(correct)
        ctx.save_for_backward(*(x for x in (grad_hidden, grad_weight) if x is not None))
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.has_weight_grad = grad_weight is not None
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_correct: torch.Tensor):
        saved = ctx.saved_tensors
        grad_hidden = (saved[0] * grad_loss).to(ctx.dtypes[0])
        grad_weight = (saved[1] * grad_loss).to(ctx.dtypes[1]) if ctx.has_weight_grad else None
        return grad_hidden, grad_weight, None, None, None


def compute_dtype_for(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the model's own matmuls run in here: the autocast dtype when autocast is on."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


def trained_token_loss(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed next-token loss over trained positions, top-1 hits and the trained-token count.

    ``hidden`` is the final (normed) hidden state [batch, seq, dim]; ``labels`` [batch, seq] holds -100 where
    nothing is trained; position i predicts label i + 1.
    """
    labels = labels[:, 1:]
    mask = labels != -100
    selected = hidden[:, :-1][mask]
    need_grad = torch.is_grad_enabled() and (selected.requires_grad or weight.requires_grad)
    loss, correct = FusedLinearCrossEntropy.apply(selected, weight, labels[mask], compute_dtype_for(hidden),
                                                  need_grad)
    return loss, correct, mask.sum()


def is_plain_projection(hidden: torch.Tensor, weight: torch.Tensor, logits: torch.Tensor) -> bool:
    """Whether ``logits`` (the model's own, for the last position) are exactly ``hidden @ weight.T``: no logit
    scale, softcap or bias, so :func:`trained_token_loss` computes the model's loss.

    Both sides are computed in the dtype the model's matmuls run in (bf16 under autocast) and compared by
    relative error over the whole row. An element-wise tolerance rejected SmolLM2's plain head under bf16
    autocast with eager attention (logits of magnitude ~20 differ by more than 0.05 from an fp32
    recomputation); a scale or a softcap moves the row by several per cent.
    """
    with torch.no_grad():
        compute = compute_dtype_for(hidden)
        ours = (hidden[:, -1].to(compute) @ weight.to(compute).t()).float()
        theirs = logits[:, -1].float()
        return ours.shape == theirs.shape and bool((ours - theirs).norm() <= PLAIN_HEAD_RELATIVE_ERROR * theirs.norm())


class SelectedLogProbs(torch.autograd.Function):
    """Log-probabilities of ``targets`` under ``hidden @ weight.T / temperature``, one per row, with any upstream
    gradient per row (DPO weighs each sequence's sum, GRPO each token). The logits of a chunk of rows live only
    inside the loop. Where the hidden states need a gradient, d(log p)/d(hidden) (a [rows, dim] tensor) is
    computed in the forward, so the backward only scales it by the upstream gradient; the head weight's gradient
    (a full fine-tune's tied embedding) needs the upstream gradient inside the vocabulary-sized product, so the
    backward projects the chunks again for it. The non-differentiable extras (entropy, mean logit, top-1 hit),
    which TRL's trainers log, come from the same pass over each chunk."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, compute_dtype: torch.dtype,
                temperature: float, need_grad: bool, extras: tuple[str, ...]):
        rows = max(64, CHUNK_BYTES // (weight.shape[0] * 4))
        w = weight.to(compute_dtype)
        n = hidden.shape[0]
        logps = torch.empty(n, dtype=torch.float32, device=hidden.device)
        outputs = {name: torch.empty(n, dtype=torch.bool if name == "is_top1" else torch.float32,
                                     device=hidden.device) for name in extras}
        unit = (torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
                if need_grad and ctx.needs_input_grad[0] else None)
        for start in range(0, n, rows):
            h = hidden[start:start + rows].to(compute_dtype)
            t = targets[start:start + rows]
            logits = (h @ w.t()).float()
            if temperature != 1.0:
                logits /= temperature
            # As in FusedLinearCrossEntropy: one max pass, one softmax, the log-normaliser read at the top-1 token.
            top, predicted = logits.max(dim=-1)
            probs = torch.softmax(logits, dim=-1)
            log_norm = top - probs.gather(1, predicted[:, None]).squeeze(1).log()
            logps[start:start + rows] = logits.gather(1, t[:, None]).squeeze(1) - log_norm
            if "entropy" in outputs:
                outputs["entropy"][start:start + rows] = log_norm - (probs * logits).sum(-1)
            if "mean_logits" in outputs:
                outputs["mean_logits"][start:start + rows] = logits.mean(-1)
            if "is_top1" in outputs:
                outputs["is_top1"][start:start + rows] = predicted == t
            del logits
            if unit is not None:
                # d(log p_target)/d(logits) = one_hot(target) - softmax, through the temperature.
                probs.neg_()
                probs[torch.arange(t.shape[0], device=t.device), t] += 1
                if temperature != 1.0:
                    probs /= temperature
                unit[start:start + rows] = probs.to(compute_dtype) @ w
        ctx.mark_non_differentiable(*outputs.values())
        ctx.weight_grad = need_grad and ctx.needs_input_grad[1]
        ctx.settings = (compute_dtype, temperature, rows, hidden.dtype, weight.dtype)
        ctx.save_for_backward(unit, hidden if ctx.weight_grad else None, weight if ctx.weight_grad else None,
                              targets if ctx.weight_grad else None)
        return (logps, *outputs.values())

    @staticmethod
    def backward(ctx, grad_logps: torch.Tensor, *_extras: torch.Tensor):
        unit, hidden, weight, targets = ctx.saved_tensors
        compute_dtype, temperature, rows, hidden_dtype, weight_dtype = ctx.settings
        grad_hidden = (unit * grad_logps[:, None]).to(hidden_dtype) if unit is not None else None
        grad_weight = None
        if ctx.weight_grad:
            w = weight.to(compute_dtype)
            accumulated = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            for start in range(0, hidden.shape[0], rows):
                h = hidden[start:start + rows].to(compute_dtype)
                t = targets[start:start + rows]
                logits = (h @ w.t()).float()
                if temperature != 1.0:
                    logits /= temperature
                g = torch.softmax(logits, dim=-1).neg_()
                del logits
                g[torch.arange(t.shape[0], device=t.device), t] += 1
                g *= grad_logps[start:start + rows, None] / temperature
                accumulated += g.to(compute_dtype).t() @ h
            grad_weight = accumulated.to(weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def selected_log_probs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                       extras: tuple[str, ...] = ()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-row log-probability of ``targets`` [rows] under the head ``weight`` applied to ``hidden`` [rows, dim],
    plus the ``extras`` asked for (``entropy``, ``mean_logits``, ``is_top1``; no gradient), without
    materialising more than a chunk of logits. See :class:`SelectedLogProbs`."""
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    out = SelectedLogProbs.apply(hidden, weight, targets, compute_dtype_for(hidden), float(temperature), need_grad,
                                 tuple(extras))
    return out[0], dict(zip(extras, out[1:], strict=True))
