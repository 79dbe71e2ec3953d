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
