"""The seven weighted training objectives of Spectra-NSA (SPEC section 5) and the temperature schedule.

For a batch of (anchor, positive, negative) triplets, with InfoNCE(q, k) = CE(q kᵀ / T, arange):

    sem      Σ_dim w_dim · symmetric InfoNCE on embedding_semantic[dim]        (Matryoshka: 768, 512, 256)
    anchor   symmetric InfoNCE on anchor64
    bridge   0.5 · Σ_{anchor, positive} MSE(normalize(sem_min[:e]), entity_e)  (e = smallest entity dim;
             sem_min detached with `detach_aux_heads`, so that only `sem` moves the backbone)
    fast     symmetric InfoNCE + TripletMargin(0.3) on retrieval128
    rank     symmetric InfoNCE + TripletMargin(0.3) on embedding_ranking
    angular  MSE of the (pos, neg) cosines at retrieval128 vs the detached ranking embedding's
    spec     -entropy(softmax(spectral)), i.e. the spectral vector is pushed towards high entropy

"Symmetric" is the mean of both directions. Beyond the original (which used in-batch positives only),
the hard negatives are extra columns of the anchor->candidate direction, as in sentence-transformers'
MultipleNegativesRankingLoss (`hard_negatives_in_infonce`), and under several processes the candidates
are gathered from all of them, so every process sees the global batch's negatives.

Each term is returned unweighted in `LossOutput.terms` (for logging); `LossOutput.total` is the weighted
sum. A term whose toggle is off is absent, not zero.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import NSAConfig

# helpers


def temperature_at(step: int, total_steps: int, config: NSAConfig) -> float:
    """T_start for the first `temperature_hold_fraction` of the steps, then cosine down to T_end."""
    t0, t1 = config.temperature_start, config.temperature_end
    hold = config.temperature_hold_fraction * total_steps
    if total_steps <= 0 or step <= hold:
        return t0
    progress = min(1.0, (step - hold) / max(total_steps - hold, 1e-12))
    return t1 + (t0 - t1) * 0.5 * (1.0 + math.cos(math.pi * progress))


def gather_candidates(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All processes' rows of `t` concatenated (gradients flow back to each process's own rows), and the
    offset of this process's rows; `(t, 0)` when not running distributed."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return t, 0
    world = torch.distributed.get_world_size()
    if world == 1:
        return t, 0
    return all_gather_with_grad(t.contiguous()), torch.distributed.get_rank() * t.shape[0]


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Every process's `t` (same shape on each) concatenated on dim 0, differentiable: the backward pass sums
    each process's gradient for a row into the process that owns the row.

    torch 2.13 has `all_gather_single` with an autograd kernel; where it is missing (2.6-2.12) or not
    differentiable, `torch.distributed.nn.functional.all_gather` (differentiable since torch 1.8, deprecated
    in 2.13 in favour of the former). A result without a gradient where `t` has one raises: the in-batch negatives of the other
    processes would silently stop training this process's embeddings.
    """
    group = torch.distributed.group.WORLD
    needs_grad = t.requires_grad and torch.is_grad_enabled()
    gathered = None
    try:
        from torch.distributed._functional_collectives import all_gather_single
    except ImportError:
        all_gather_single = None
    if all_gather_single is not None:
        gathered = all_gather_single(t, 0, group)
        if needs_grad and not gathered.requires_grad:
            gathered = None  # the same on every process (one torch), so every process takes the fallback
    if gathered is None:
        from torch.distributed.nn.functional import all_gather

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # its deprecation notice, once per call
            gathered = torch.cat(all_gather(t, group=group), dim=0)
    if needs_grad and not gathered.requires_grad:
        raise RuntimeError(f"torch {torch.__version__}: gathering in-batch candidates across processes dropped "
                           f"their gradient; use torch >= 2.6")
    return gathered


def unreached_parameters(config: NSAConfig) -> tuple[str, ...]:
    """Name prefixes of the model's parameters that no enabled loss term reaches (so they get no gradient).

    The entity head feeds only the bridge; retrieval128 only `fast` and `angular`; the ranking output and
    the anomalous basis only `rank` (`angular` reads the ranking embedding detached); the anomalous and
    spectral vectors `rank` and `spec`. The trainer freezes these, because DistributedDataParallel stops
    on a trainable parameter without a gradient. tests/test_losses.py checks this list against autograd
    for every combination of toggles.
    """
    c = config
    unreached = []
    if not c.use_bridge:
        unreached.append("ent_head.")
    if not (c.use_fast or c.use_angular):
        unreached.append("retr.")
    if not c.use_rank:
        unreached += ["rank_head.out.", "rank_head.anom_basis"]
        if not c.use_spectral:
            unreached += ["rank_head.to_anom.", "rank_head.to_spec."]
    return tuple(unreached)


def info_nce(queries: torch.Tensor, keys: torch.Tensor, temperature: float,
             extra_keys: torch.Tensor | None = None, gather: bool = True) -> torch.Tensor:
    """CE(queries · [keys; extra_keys]ᵀ / T, i): row i's positive is keys[i], every other column a negative.

    queries, keys: (B, D) L2-normalised; extra_keys: (B', D) more negatives (e.g. hard negatives).
    With `gather`, candidates come from all processes (labels offset by this process's rank).
    """
    gathered = gather_candidates if gather else (lambda t: (t, 0))
    candidates, offset = gathered(keys)
    if extra_keys is not None:
        candidates = torch.cat([candidates, gathered(extra_keys)[0]], dim=0)
    logits = queries @ candidates.T / temperature  # (B, B_all [+ B'_all])
    labels = torch.arange(queries.shape[0], device=queries.device) + offset
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels)


def symmetric_info_nce(anchor: torch.Tensor, positive: torch.Tensor, temperature: float,
                       negative: torch.Tensor | None = None, gather: bool = True) -> torch.Tensor:
    """Mean of anchor->[positives; negatives] and positive->anchors InfoNCE."""
    return 0.5 * (info_nce(anchor, positive, temperature, negative, gather)
                  + info_nce(positive, anchor, temperature, None, gather))


def rowwise_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a, b, dim=-1)


@dataclass
class LossOutput:
    """`total`: the weighted sum to backpropagate; `terms`: each enabled term, unweighted (0-dim tensors);
    `weights`: the weight of each term in `total`."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]
    weights: dict[str, float]

    def nonfinite_terms(self) -> list[str]:
        """Names of the terms whose value is NaN or infinite (one device sync)."""
        names = list(self.terms)
        finite = torch.isfinite(torch.stack([self.terms[n].detach().float() for n in names])).tolist()
        return [n for n, ok in zip(names, finite) if not ok]

    def as_floats(self) -> dict[str, float]:
        """{'loss': total, 'loss_<term>': value, ...} as Python floats, for the metrics stream."""
        values = torch.stack([self.total.detach().float()] + [v.detach().float() for v in self.terms.values()]).tolist()
        return {"loss": values[0], **{f"loss_{n}": v for n, v in zip(self.terms, values[1:])}}


# classes


class NSALoss(nn.Module):
    """The weighted sum of the SPEC 5 terms, toggled and weighted by an `NSAConfig`.

    Args:
        config: `loss_weights` (per term), `sem_weights` (per Matryoshka dim), the toggles `use_matryoshka`,
            `use_anchor64`, `use_bridge`, `use_fast`, `use_rank`, `use_angular`, `use_spectral` (drops
            `spec`), `hard_negatives_in_infonce`, `triplet_margin`.
        gather: gather InfoNCE candidates across processes when running distributed.

    Inputs: the model's output dicts for anchors, positives and negatives (same batch size), and the
    temperature for this step (see `temperature_at`).

    Example:
        >>> loss_fn = NSALoss(config)
        >>> out = loss_fn(model(**a), model(**p), model(**n), temperature=0.07)
        >>> out.total.backward(); print(out.as_floats())
    """

    def __init__(self, config: NSAConfig, *, gather: bool = True):
        super().__init__()
        self.config = config
        self.gather = gather
        self.triplet = nn.TripletMarginLoss(margin=config.triplet_margin)
        c = config
        enabled = {"sem": True, "anchor": c.use_anchor64, "bridge": c.use_bridge, "fast": c.use_fast,
                   "rank": c.use_rank, "angular": c.use_angular, "spec": c.use_spectral}
        self.weights = {name: c.loss_weights[name] for name, on in enabled.items() if on}

    def forward(self, anchor: dict, positive: dict, negative: dict, *, temperature: float) -> LossOutput:
        c = self.config
        if anchor["pooled"].shape[0] == 0:
            raise ValueError("empty batch: no triplets to compute a loss on")
        hard = c.hard_negatives_in_infonce

        def nce(key: str, sub=None, symmetric: bool = True) -> torch.Tensor:
            a, p, n = (out[key] if sub is None else out[key][sub] for out in (anchor, positive, negative))
            if not symmetric:
                return info_nce(a, p, temperature, n if hard else None, self.gather)
            return symmetric_info_nce(a, p, temperature, n if hard else None, self.gather)

        terms: dict[str, torch.Tensor] = {}
        dims = c.sem_dims if c.use_matryoshka else c.sem_dims[:1]
        terms["sem"] = sum(w * nce("embedding_semantic", d, c.sem_symmetric) for d, w in zip(dims, c.sem_weights))
        if "anchor" in self.weights:
            terms["anchor"] = nce("anchor64")
        if "bridge" in self.weights:
            d, e = c.sem_dims[-1], c.ent_dims[-1]

            def semantic(out):  # with detach_aux_heads the bridge moves the entity head only
                sem = out["embedding_semantic"][d][:, :e]
                return sem.detach() if c.detach_aux_heads else sem

            terms["bridge"] = 0.5 * sum(F.mse_loss(F.normalize(semantic(out), dim=-1), out["entity"][e])
                                        for out in (anchor, positive))
        for name, key in (("fast", "retrieval128"), ("rank", "embedding_ranking")):
            if name in self.weights:
                terms[name] = nce(key) + self.triplet(anchor[key], positive[key], negative[key])
        if "angular" in self.weights:
            fast = torch.stack([rowwise_cosine(anchor["retrieval128"], positive["retrieval128"]),
                                rowwise_cosine(anchor["retrieval128"], negative["retrieval128"])])
            with torch.no_grad():
                rank = torch.stack([rowwise_cosine(anchor["embedding_ranking"], positive["embedding_ranking"]),
                                    rowwise_cosine(anchor["embedding_ranking"], negative["embedding_ranking"])])
            terms["angular"] = F.mse_loss(fast, rank)
        if "spec" in self.weights:
            spectral = torch.cat([out["spectral"] for out in (anchor, positive, negative)])
            spectral = spectral.to(torch.promote_types(spectral.dtype, torch.float32))
            log_p = spectral.log_softmax(-1)
            terms["spec"] = (log_p.exp() * log_p).sum(-1).mean()  # = -entropy
        total = sum(self.weights[name] * value for name, value in terms.items())
        return LossOutput(total=total, terms=terms, weights=dict(self.weights))
