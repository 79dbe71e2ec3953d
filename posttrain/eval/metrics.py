"""Teacher-forced metrics of a model on held-out rows: what it would say, without generating.

- :func:`reply_scores`: loss (mean negative log-likelihood per reply token, as TRL's SFT reports it) and token
  accuracy (the share of reply tokens that are the model's top-1 prediction), over the rows' replies;
- :func:`preference_scores`: a causal LM's preference between a pair's replies: accuracy (the share of pairs
  whose chosen reply has the higher log-probability) and margin (the mean difference, in nats);
- :func:`pairwise_scores`: a reward model's (a sequence-classification head) accuracy on the pairs: the
  share whose chosen reply it scores higher, and the mean score margin.

Rows are scored in micro-batches whose logits stay under :data:`LOGITS_BYTES`; the model runs in eval mode
without gradients and goes back to the mode it was in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from posttrain.data.eval_rows import EvalRow, Text, text_of
from posttrain.data.formats import common_prefix_length
from posttrain.modeling import render_scored

# fp32 logits held at once while scoring (batch x length x vocabulary x 4 bytes).
LOGITS_BYTES = 256 << 20


@contextlib.contextmanager
def evaluating(model) -> Iterator[None]:
    """The model in eval mode (no dropout) and without gradients, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            model.train()


def _as_messages(reply: Text) -> list[dict[str, str]]:
    return reply if isinstance(reply, list) else [{"role": "assistant", "content": reply}]


def reply_tokens(tokenizer, prompt: Text | None, reply: Text, max_length: int) -> tuple[list[int], int]:
    """The token ids of prompt + reply (right-truncated to ``max_length``) and where the reply starts.

    A conversation goes through the chat template, the reply being what the full conversation adds to the
    prompt with its generation prompt; a plain prompt is followed by the reply and EOS; a plain-text row
    (no prompt) is scored from its second token on."""
    if prompt is None:
        ids = tokenizer(text_of(reply))["input_ids"]
        return ids[:max_length], 1
    if isinstance(prompt, list):
        prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        full_text = tokenizer.apply_chat_template([*prompt, *_as_messages(reply)], tokenize=False)
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
        start = common_prefix_length(prompt_ids, ids)
    else:
        prompt_ids = tokenizer(prompt)["input_ids"]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        ids = prompt_ids + tokenizer(text_of(reply), add_special_tokens=False)["input_ids"] + eos
        start = len(prompt_ids)
    return ids[:max_length], max(1, min(start, max_length))


@dataclass
class TokenScores:
    """Per sequence: the summed log-probability of its scored tokens, their count and the top-1 hits."""

    logprob: list[float]
    tokens: list[int]
    correct: list[int]


def score_tokens(model, sequences: list[tuple[list[int], int]], pad_id: int, batch_size: int) -> TokenScores:
    """Teacher-forced scores of each ``(ids, start)``: the tokens from ``start`` on, each predicted from those
    before it. Sequences of similar length are batched together (right-padded)."""
    device = next(model.parameters()).device
    vocab = int(model.get_output_embeddings().weight.shape[0])
    order = sorted(range(len(sequences)), key=lambda index: len(sequences[index][0]))
    scores = TokenScores([0.0] * len(sequences), [0] * len(sequences), [0] * len(sequences))
    position = 0
    while position < len(order):
        width = len(sequences[order[min(position + batch_size, len(order)) - 1]][0])
        rows = max(1, min(batch_size, LOGITS_BYTES // max(1, width * vocab * 4)))
        chunk = order[position:position + rows]
        position += len(chunk)
        width = max(len(sequences[index][0]) for index in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, index in enumerate(chunk):
            ids = sequences[index][0]
            input_ids[row, :len(ids)] = torch.tensor(ids)
            mask[row, :len(ids)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        targets = input_ids[:, 1:].to(device)
        picked = logprobs.gather(-1, targets[..., None]).squeeze(-1)
        hits = logprobs.argmax(dim=-1) == targets
        for row, index in enumerate(chunk):
            ids, start = sequences[index]
            # Position t predicts token t + 1: the scored tokens start..len-1 are predicted at start-1..len-2.
            span = slice(start - 1, len(ids) - 1)
            scores.logprob[index] = float(picked[row, span].sum())
            scores.tokens[index] = max(0, len(ids) - start)
            scores.correct[index] = int(hits[row, span].sum())
    return scores


def reply_scores(model, tokenizer, rows: list[EvalRow], max_length: int, batch_size: int) -> dict[str, float]:
    """loss and mean_token_accuracy over the replies of ``rows`` (reply, text and pair rows: the chosen reply)."""
    scored = [row for row in rows if row.reply is not None]
    if not scored:
        return {}
    sequences = [reply_tokens(tokenizer, row.prompt, row.reply, max_length) for row in scored]  # type: ignore[arg-type]
    with evaluating(model):
        scores = score_tokens(model, sequences, _pad_id(tokenizer), batch_size)
    tokens = sum(scores.tokens)
    if not tokens:
        return {}
    return {"loss": -sum(scores.logprob) / tokens, "mean_token_accuracy": sum(scores.correct) / tokens}


def preference_scores(model, tokenizer, rows: list[EvalRow], max_length: int, batch_size: int) -> dict[str, float]:
    """preference_accuracy and preference_margin over the pairs among ``rows`` (reference-free: the model's
    own log-probabilities of the two replies, summed over their tokens)."""
    pairs = [row for row in rows if row.kind == "pair"]
    if not pairs:
        return {}
    sequences = [reply_tokens(tokenizer, row.prompt, reply, max_length)  # type: ignore[arg-type]
                 for row in pairs for reply in (row.reply, row.rejected)]
    with evaluating(model):
        scores = score_tokens(model, sequences, _pad_id(tokenizer), batch_size)
    margins = [scores.logprob[2 * i] - scores.logprob[2 * i + 1] for i in range(len(pairs))]
    return {"preference_accuracy": sum(m > 0 for m in margins) / len(margins),
            "preference_margin": sum(margins) / len(margins)}


def pairwise_scores(model, tokenizer, rows: list[EvalRow], max_length: int, batch_size: int) -> dict[str, float]:
    """pairwise_accuracy and pairwise_margin of a reward model over the pairs among ``rows``."""
    pairs = [row for row in rows if row.kind == "pair"]
    if not pairs:
        return {}
    texts = [render_scored(tokenizer, row.prompt or "", text_of(reply)) for row in pairs
             for reply in (row.reply, row.rejected)]
    device = next(model.parameters()).device
    values: list[float] = []
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        with evaluating(model):
            for start in range(0, len(texts), batch_size):
                batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True, truncation=True,
                                  max_length=max_length, add_special_tokens=False)
                values.extend(model(**batch.to(device)).logits[:, 0].float().tolist())
    finally:
        tokenizer.padding_side = padding_side
    margins = [values[2 * i] - values[2 * i + 1] for i in range(len(pairs))]
    return {"pairwise_accuracy": sum(m > 0 for m in margins) / len(margins),
            "pairwise_margin": sum(margins) / len(margins)}


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
