"""Health monitoring of a training run (the original's checks, made measurable).

Every optimizer step the trainer adds to its metrics record:

    grad_norm_mean / _std / _max   over the per-parameter gradient norms (before clipping)
    dead_grad_ratio                fraction of gradient entries that are exactly zero (embedding tables aside)
    collapse                       mean off-diagonal cosine of the batch's semantic embeddings (1 = collapsed)
    effective_rank                 exp(entropy of the normalised singular values) of those embeddings
    embedding_std                  mean over dimensions of their std across the batch
    anomaly_mean / anomaly_std     of the anomaly score
    spectral_entropy               entropy of softmax(spectral), in nats
    nonfinite_embeddings           fraction of NaN or infinite entries of those embeddings (0 when healthy)

A statistic whose inputs are not all finite is left out of the record rather than logged as NaN (and the
SVD of NaN embeddings would raise). `warnings` lists the checks that fail, reported only after
`health_warmup_steps` (default 5000, as the original, to avoid false alarms early on), except non-finite
embeddings: they are a failure at any step. Evaluations are compared with a real baseline measured on the
same pairs (all-MiniLM-L6-v2) and with the original's targets per preset.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import NSAConfig

# the original's "SOTA comparison" targets for the quick STS check
TARGET_STS = {"M456": 0.825, "M600": 0.835, "M700": 0.840, "M1B": 0.850}

# thresholds of the health checks
COLLAPSE_MAX = 0.9  # mean off-diagonal cosine above this: embeddings have collapsed
EFFECTIVE_RANK_MIN_FRACTION = 0.1  # effective rank below 10% of min(batch, dim)
DEAD_GRAD_MAX = 0.5  # more than half of the gradient entries exactly zero
GRAD_SPIKE_FACTOR = 100.0  # one parameter's gradient norm above 100x the mean
EMBEDDING_STD_MIN = 1e-3


@torch.no_grad()
def gradient_stats(named_parameters) -> dict[str, float]:
    """Statistics of the per-parameter gradient norms; `dead_grad_ratio` leaves out the embedding tables,
    whose rows for tokens absent from the batch get no gradient by nature."""
    named = [(n, p.grad) for n, p in named_parameters if p.grad is not None]
    if not named:
        return {}
    norms = torch.stack(torch._foreach_norm([g for _, g in named])).float()
    dense = [g for n, g in named if not n.endswith("_emb.weight")]
    zeros = int(torch.stack([(g == 0).sum() for g in dense]).sum()) if dense else 0  # one device sync, not one per tensor
    total = max(1, sum(g.numel() for g in dense))
    return {"grad_norm_mean": float(norms.mean()), "grad_norm_std": float(norms.std()) if len(norms) > 1 else 0.0,
            "grad_norm_max": float(norms.max()), "dead_grad_ratio": zeros / total}


@torch.no_grad()
def embedding_stats(outputs: dict) -> dict[str, float]:
    """Health of one batch of model outputs (the anchors' dict).

    `nonfinite_embeddings` is always present. The statistics of the semantic embeddings (collapse,
    effective rank, std) need them all finite: with a NaN the SVD raises, so they are left out; the anomaly
    and spectral statistics are likewise left out when their own inputs are not finite.
    """
    sem = outputs["embedding_semantic"]
    raw = sem[max(sem)].detach().float()  # (B, D)
    finite = torch.isfinite(raw)
    stats: dict[str, float] = {"nonfinite_embeddings": float((~finite).float().mean())}
    B = raw.shape[0]
    if B > 1 and stats["nonfinite_embeddings"] == 0.0:
        z = F.normalize(raw, dim=-1)
        cos = z @ z.T
        stats["collapse"] = float((cos.sum() - cos.diagonal().sum()) / (B * (B - 1)))
        singular = torch.linalg.svdvals(z - z.mean(0))
        p = singular / singular.sum().clamp_min(1e-12)
        stats["effective_rank"] = float(torch.exp(-(p * p.clamp_min(1e-12).log()).sum()))
        stats["embedding_std"] = float(z.std(0).mean())
    score = outputs["anomaly_score"].detach().float()
    if B > 1 and bool(torch.isfinite(score).all()):
        stats["anomaly_mean"], stats["anomaly_std"] = float(score.mean()), float(score.std())
    spectral = outputs["spectral"].detach().float()
    if bool(torch.isfinite(spectral).all()):
        log_p = spectral.log_softmax(-1)
        stats["spectral_entropy"] = float(-(log_p.exp() * log_p).sum(-1).mean())
    return stats


def health_warnings(record: dict, config: NSAConfig, batch_size: int) -> list[str]:
    """The failed checks for one metrics record; before the warm-up ends only non-finite embeddings."""
    found = []
    nonfinite = record.get("nonfinite_embeddings", 0.0)
    if nonfinite > 0:  # always a failure, so not held back by the warm-up
        found.append(f"non-finite embeddings: {100 * nonfinite:.3g}% of entries are NaN or infinite")
    if record.get("step", 0) < config.health_warmup_steps:
        return found
    if record.get("collapse", 0.0) > COLLAPSE_MAX:
        found.append(f"embedding collapse: mean cosine between different sentences {record['collapse']:.3f}")
    dim = config.sem_dims[0]
    if "effective_rank" in record and record["effective_rank"] < EFFECTIVE_RANK_MIN_FRACTION * min(batch_size, dim):
        found.append(f"low effective rank {record['effective_rank']:.1f} of at most {min(batch_size, dim)}")
    if record.get("embedding_std", 1.0) < EMBEDDING_STD_MIN:
        found.append(f"embeddings barely vary across the batch (std {record['embedding_std']:.2e})")
    if record.get("dead_grad_ratio", 0.0) > DEAD_GRAD_MAX:
        found.append(f"{100 * record['dead_grad_ratio']:.0f}% of gradient entries are exactly zero")
    mean, peak = record.get("grad_norm_mean"), record.get("grad_norm_max")
    if mean and peak and math.isfinite(peak) and peak > GRAD_SPIKE_FACTOR * mean:
        found.append(f"gradient spike: a parameter's norm {peak:.3g} is {peak / mean:.0f}x the mean")
    if not math.isfinite(record.get("loss", 0.0)):
        found.append("non-finite loss")
    return found
