"""Cached in-batch negatives (GradCache): a contrastive batch as large as you like on a small GPU.

In-batch InfoNCE wants a large batch (every other row is a negative), but a forward pass with its graph
over the whole batch may not fit. GradCache (Gao et al., 2021, "Scaling Deep Contrastive Learning Batch
Size under Memory Limited Setup") splits the step in three:

    1. embed the batch in chunks of `mini_batch_size` sequences without a graph   (memory: one chunk)
    2. the losses on the whole batch, on those embeddings made leaves: their gradients, d loss / d e
    3. per chunk: the same forward again, now with a graph, and backward(e_chunk, d loss / d e_chunk)

Step 3 gives exactly the gradient of the whole-batch loss, since the loss reaches the weights only through
the embeddings: dL/dθ = Σ_chunks (dL/de_chunk) · (de_chunk/dθ). Dropout draws the same masks in 1 and 3
because each chunk's RNG state is saved before step 1 and restored before step 3.

The result equals an uncached step whose forward runs chunk by chunk (the same rows, padding and RNG
draws); with dropout off, it equals one forward over the whole batch up to rounding (tests/test_gradcache.py:
float64, <= 1e-8). Under several processes, only the last chunk's backward synchronises gradients.

Not handled here: models whose outputs for a row depend on other rows of the batch (ours do not: no
batch norm, and padding never reaches a real token).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch


def _rng_state(device: torch.device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _tensors(out: dict) -> list[tuple[tuple, torch.Tensor]]:
    """The floating-point tensors of a model output dict (nested one level), with their keys."""
    found = []
    for key, value in out.items():
        if isinstance(value, dict):
            found += [((key, sub), t) for sub, t in value.items() if torch.is_tensor(t) and t.is_floating_point()]
        elif torch.is_tensor(value) and value.is_floating_point():
            found.append(((key,), value))
    return found


def _concat(chunks: list[dict]) -> dict:
    """Chunk output dicts -> one dict of tensors concatenated on the batch dim."""
    joined: dict = {}
    for key, value in chunks[0].items():
        if isinstance(value, dict):
            joined[key] = {sub: torch.cat([c[key][sub] for c in chunks]) for sub in value}
        elif torch.is_tensor(value):
            joined[key] = torch.cat([c[key] for c in chunks]) if value.dim() else value
    return joined


def cached_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], loss_of: Callable[[dict], object],
                mini_batch_size: int, *, backward_scale: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
                autocast=nullcontext, no_sync=nullcontext, decide: Callable[[object], bool] = lambda loss: True):
    """One GradCache forward/backward of `model` on `batch` ({'input_ids', 'attention_mask'}, rows = sequences).

    `loss_of(outputs) -> LossOutput` computes the loss on the whole batch's outputs. `backward_scale(total)`
    is what is backpropagated (e.g. a grad scaler's `scale(total / grad_accum)`). `autocast()` wraps every
    forward; `no_sync()` wraps every backward but the last (DDP). `decide(loss)` is called once the loss is
    known; if it returns False nothing is backpropagated (a skipped step). Returns (loss, whole-batch
    outputs without a graph, backpropagated?).
    """
    rows = batch["input_ids"].shape[0]
    device = batch["input_ids"].device
    spans = [slice(s, min(s + mini_batch_size, rows)) for s in range(0, rows, mini_batch_size)]
    states, chunks = [], []
    with torch.no_grad():  # 1. embeddings, chunk by chunk, no graph
        for span in spans:
            states.append(_rng_state(device))
            with autocast():
                out = model(**{k: v[span] for k, v in batch.items()})
            out.pop("last_hidden_state", None)  # (rows, S, H): the losses read only the pooled embeddings
            chunks.append(out)
    after = _rng_state(device)  # where an uncached forward would have left the RNG streams
    outputs = _concat(chunks)
    leaves = _tensors(outputs)
    for _, t in leaves:
        t.requires_grad_(True)
    with autocast():  # 2. the loss on the whole batch; gradients w.r.t. the embeddings
        loss = loss_of(outputs)
    if not decide(loss):
        return loss, outputs, False
    leaf_tensors = [t for _, t in leaves]
    grads = torch.autograd.grad(backward_scale(loss.total), leaf_tensors, allow_unused=True)
    grad_of = {key: g for (key, _), g in zip(leaves, grads)}
    for n, span in enumerate(spans):  # 3. per chunk: forward with a graph, the cached gradients backward
        _set_rng_state(states[n], device)
        with no_sync() if n < len(spans) - 1 else nullcontext():
            with autocast():
                out = model(**{k: v[span] for k, v in batch.items()})
            pairs = [(t, grad_of[key][span]) for key, t in _tensors(out)
                     if grad_of.get(key) is not None and t.requires_grad and t.dim() > 0]
            torch.autograd.backward([t for t, _ in pairs], [g.to(t.dtype) for t, g in pairs])
    _set_rng_state(after, device)
    for _, t in leaves:
        t.requires_grad_(False)
    return loss, outputs, True
