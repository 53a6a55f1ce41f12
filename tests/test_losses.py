"""NSALoss (SPEC 5) term by term against hand computations, its toggles and weights, and the temperature
schedule.

The hand computations use explicit loops over rows in float64 (InfoNCE as -s_ii/T + log Σ_j exp(s_ij/T),
cosines as dot products over norms, distances as square roots of sums of squares), so they share no code
path with torch's cross_entropy / TripletMarginLoss / cosine_similarity that the library uses.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from nsa_lib import NSAConfig, NSALoss, NSAModel, temperature_at
from nsa_lib.config import DEFAULT_LOSS_WEIGHTS, LOSS_TERMS
from nsa_lib.losses import info_nce, symmetric_info_nce, unreached_parameters

# helpers

B = 3
T = 0.07
TOL = 1e-5  # the library computes logits in float32; TripletMarginLoss adds eps=1e-6 to the difference
EPS_TRIPLET = 1e-6


def tiny_config(**overrides) -> NSAConfig:
    return NSAConfig.from_preset("tiny", **overrides)


def random_unit(g, n, dim):
    return F.normalize(torch.randn(n, dim, generator=g), dim=-1)


def make_outputs(config: NSAConfig, seed=0, requires_grad=False) -> tuple[dict, dict, dict]:
    """Three model-output dicts (anchor, positive, negative) of B rows with the tiny preset's keys and dims.

    The Matryoshka dicts are prefixes of one vector, as the model makes them. Row 0's positive is a small
    perturbation of its anchor, so its triplet hinge is inactive (exercises the max(., 0)); the others are
    random. With `requires_grad`, the pre-normalisation tensors are leaves (returned under "_leaves").
    """
    g = torch.Generator().manual_seed(seed)
    c = config
    outs = []
    leaves = {}
    base = {}
    for role in ("anchor", "positive", "negative"):
        def emb(name, dim):
            raw = torch.randn(B, dim, generator=g)
            if role == "positive":  # row 0 close to the anchor's row 0
                raw[0] = base[name][0] + 0.05 * torch.randn(dim, generator=g)
            if role == "anchor":
                base[name] = raw.clone()
            if requires_grad:
                raw.requires_grad_(True)
                leaves[(role, name)] = raw
            return raw

        sem, ent = emb("sem", c.sem_dims[0]), emb("ent", c.ent_dims[0])
        sem_z, ent_z = F.normalize(sem, dim=-1), F.normalize(ent, dim=-1)
        out = {
            "embedding_semantic": {d: F.normalize(sem_z[:, :d], dim=-1) for d in c.sem_dims},
            "entity": {d: F.normalize(ent_z[:, :d], dim=-1) for d in c.ent_dims},
            "retrieval128": F.normalize(emb("retr", c.retrieval_dim), dim=-1),
            "anchor64": F.normalize(emb("anchor", c.anchor_dim), dim=-1),
            "embedding_ranking": F.normalize(emb("rank", c.ranking_dim), dim=-1),
            "spectral": 2.0 * emb("spectral", c.spectral_dim),
            "anomalous": torch.randn(B, c.anomalous_dim, generator=g),
            "anomaly_score": torch.rand(B, generator=g),
            "pooled": torch.randn(B, c.hidden_size, generator=g),
        }
        outs.append(out)
    if requires_grad:
        outs[0]["_leaves"] = leaves
    return tuple(outs)


def rows(t):
    return [[float(x) for x in row] for row in t.detach().double()]


def dot(u, v):
    return sum(a * b for a, b in zip(u, v))


def norm(u):
    return math.sqrt(dot(u, u))


def hand_info_nce(queries, keys, temperature, extra=None):
    """mean_i [ -q_i·k_i / T + log Σ_j exp(q_i·c_j / T) ], candidates c = keys (+ extra)."""
    q, cands = rows(queries), rows(keys) + (rows(extra) if extra is not None else [])
    total = 0.0
    for i, qi in enumerate(q):
        logits = [dot(qi, c) / temperature for c in cands]
        total += -logits[i] + math.log(sum(math.exp(z) for z in logits))
    return total / len(q)


def hand_symmetric(a, p, n, temperature, hard):
    return 0.5 * (hand_info_nce(a, p, temperature, n if hard else None) + hand_info_nce(p, a, temperature))


def hand_triplet(a, p, n, margin=0.3):
    """mean_i max(‖a_i - p_i + eps‖ - ‖a_i - n_i + eps‖ + margin, 0), eps as in torch.pairwise_distance."""
    def dist(u, v):
        return math.sqrt(sum((x - y + EPS_TRIPLET) ** 2 for x, y in zip(u, v)))

    A, P, N = rows(a), rows(p), rows(n)
    return sum(max(dist(A[i], P[i]) - dist(A[i], N[i]) + margin, 0.0) for i in range(len(A))) / len(A)


def hand_cos(u, v):
    return dot(u, v) / (norm(u) * norm(v))


def hand_mse(x, y):
    X, Y = rows(x), rows(y)
    diffs = [(a - b) ** 2 for rx, ry in zip(X, Y) for a, b in zip(rx, ry)]
    return sum(diffs) / len(diffs)


def hand_terms(config: NSAConfig, anchor, positive, negative, temperature=T) -> dict[str, float]:
    """Every enabled SPEC 5 term, unweighted, by hand."""
    c, hard = config, config.hard_negatives_in_infonce

    def nce(key, sub=None):
        a, p, n = (o[key] if sub is None else o[key][sub] for o in (anchor, positive, negative))
        return hand_symmetric(a, p, n, temperature, hard)

    terms = {}
    dims = c.sem_dims if c.use_matryoshka else c.sem_dims[:1]
    terms["sem"] = sum(w * nce("embedding_semantic", d) for d, w in zip(dims, c.sem_weights))
    if c.use_anchor64:
        terms["anchor"] = nce("anchor64")
    if c.use_bridge:
        d, e = c.sem_dims[-1], c.ent_dims[-1]
        bridge = 0.0
        for o in (anchor, positive):
            prefix = [r[:e] for r in rows(o["embedding_semantic"][d])]
            unit = torch.tensor([[x / norm(r) for x in r] for r in prefix], dtype=torch.float64)
            bridge += hand_mse(unit, o["entity"][e])
        terms["bridge"] = 0.5 * bridge
    for name, key in (("fast", "retrieval128"), ("rank", "embedding_ranking")):
        if getattr(c, f"use_{name}"):
            terms[name] = nce(key) + hand_triplet(anchor[key], positive[key], negative[key])
    if c.use_angular:
        sq = []
        for i in range(B):
            for other in (positive, negative):
                fast = hand_cos(rows(anchor["retrieval128"])[i], rows(other["retrieval128"])[i])
                rank = hand_cos(rows(anchor["embedding_ranking"])[i], rows(other["embedding_ranking"])[i])
                sq.append((fast - rank) ** 2)
        terms["angular"] = sum(sq) / len(sq)
    if c.use_spectral:
        neg_entropy = []
        for o in (anchor, positive, negative):
            for r in rows(o["spectral"]):
                z = sum(math.exp(x) for x in r)
                neg_entropy.append(sum(math.exp(x) / z * (x - math.log(z)) for x in r))
        terms["spec"] = sum(neg_entropy) / len(neg_entropy)
    return terms


def hand_total(config, terms):
    return sum(config.loss_weights[name] * value for name, value in terms.items())


def run_loss(config, outs, temperature=T):
    return NSALoss(config, gather=False)(*outs, temperature=temperature)


def assert_terms_match(out, expected):
    assert set(out.terms) == set(expected)
    for name, value in expected.items():
        assert out.terms[name].dim() == 0
        assert abs(out.terms[name].item() - value) <= TOL * max(1.0, abs(value)), (name, out.terms[name].item(), value)


# every term by hand


@pytest.mark.parametrize("hard", [True, False])
def test_every_term_matches_hand_computation(hard):
    config = tiny_config(hard_negatives_in_infonce=hard)
    outs = make_outputs(config)
    out = run_loss(config, outs)
    expected = hand_terms(config, *outs)
    assert list(out.terms) == [t for t in LOSS_TERMS if t in expected]  # logging order
    assert_terms_match(out, expected)
    assert abs(out.total.item() - hand_total(config, expected)) <= TOL
    assert out.weights == {name: DEFAULT_LOSS_WEIGHTS[name] for name in LOSS_TERMS}


def test_spec_weights_are_the_defaults():
    c = tiny_config()
    assert c.sem_weights == [0.35, 0.30, 0.25]
    assert DEFAULT_LOSS_WEIGHTS == {"sem": 1.0, "anchor": 0.15, "bridge": 0.02, "fast": 0.25, "rank": 1.0,
                                    "angular": 0.08, "spec": 0.005}


def test_hand_computation_is_not_vacuous():
    """The hinge is inactive on row 0 and active elsewhere; hard negatives change the InfoNCE terms; all
    terms are away from zero."""
    config = tiny_config()
    a, p, n = make_outputs(config)
    key = "retrieval128"
    d_ap = (a[key] - p[key]).norm(dim=-1)
    d_an = (a[key] - n[key]).norm(dim=-1)
    hinge = d_ap - d_an + 0.3
    assert hinge[0] < 0 and (hinge[1:] > 0).all()
    with_hard = hand_terms(config, a, p, n)
    without = hand_terms(tiny_config(hard_negatives_in_infonce=False), a, p, n)
    for name in ("sem", "anchor", "fast", "rank"):
        assert with_hard[name] > without[name] + 1e-3, name
    for name in ("bridge", "angular", "spec"):
        assert with_hard[name] == without[name]
        assert abs(with_hard[name]) > 1e-3, name


def test_info_nce_columns():
    """anchor->[positives; negatives] has 2B columns, positive->anchors B; the in-batch version B."""
    g = torch.Generator().manual_seed(3)
    a, p, n = (random_unit(g, B, 8).double() for _ in range(3))
    assert abs(info_nce(a, p, T, n, gather=False).item() - hand_info_nce(a, p, T, n)) <= TOL
    assert abs(info_nce(a, p, T, gather=False).item() - hand_info_nce(a, p, T)) <= TOL
    assert abs(symmetric_info_nce(a, p, T, n, gather=False).item() - hand_symmetric(a, p, n, T, True)) <= TOL
    assert abs(symmetric_info_nce(a, p, T, gather=False).item() - hand_symmetric(a, p, n, T, False)) <= TOL


@pytest.mark.parametrize("temperature", [0.05, 0.2])
def test_temperature_is_applied(temperature):
    config = tiny_config()
    outs = make_outputs(config, seed=4)
    assert_terms_match(run_loss(config, outs, temperature), hand_terms(config, *outs, temperature))


# toggles and weights


@pytest.mark.parametrize("toggle, term", [("use_anchor64", "anchor"), ("use_bridge", "bridge"), ("use_fast", "fast"),
                                          ("use_rank", "rank"), ("use_angular", "angular"), ("use_spectral", "spec")])
def test_each_toggle_removes_exactly_its_term(toggle, term):
    base_config, config = tiny_config(), tiny_config(**{toggle: False})
    outs = make_outputs(base_config, seed=1)
    base, off = run_loss(base_config, outs), run_loss(config, outs)
    assert set(base.terms) - set(off.terms) == {term} and set(off.terms) <= set(base.terms)
    assert term not in off.weights
    for name, value in off.terms.items():
        assert torch.allclose(value, base.terms[name], rtol=0, atol=1e-7), name
    removed = base.weights[term] * base.terms[term]
    assert abs(removed.item()) > 1e-6  # the test would notice a term that was left in
    assert abs(off.total.item() - (base.total - removed).item()) <= 1e-6
    assert_terms_match(off, hand_terms(config, *outs))


def test_no_matryoshka_uses_the_largest_dim_with_its_weight():
    base_config, config = tiny_config(), tiny_config(use_matryoshka=False)
    outs = make_outputs(base_config, seed=2)
    base, off = run_loss(base_config, outs), run_loss(config, outs)
    assert set(off.terms) == set(base.terms)
    a, p, n = (o["embedding_semantic"][64] for o in outs)
    expected_sem = 0.35 * hand_symmetric(a, p, n, T, True)
    assert abs(off.terms["sem"].item() - expected_sem) <= TOL
    assert abs(base.terms["sem"].item() - expected_sem) > 1e-2
    for name in set(base.terms) - {"sem"}:
        assert torch.equal(off.terms[name], base.terms[name]), name
    assert abs(off.total.item() - (base.total - base.terms["sem"] + off.terms["sem"]).item()) <= 1e-6


def test_custom_loss_weights_change_the_total():
    weights = {"sem": 0.5, "anchor": 1.0, "bridge": 3.0, "fast": 0.0, "rank": 2.0, "angular": 1.5, "spec": 0.5}
    config = tiny_config(loss_weights=weights, sem_weights=[1.0, 0.0, 0.5])
    outs = make_outputs(config, seed=5)
    out = run_loss(config, outs)
    expected = hand_terms(config, *outs)
    assert out.weights == weights
    assert_terms_match(out, expected)
    assert abs(out.total.item() - sum(weights[k] * v for k, v in expected.items())) <= TOL
    default = run_loss(tiny_config(), outs)
    assert abs(out.total.item() - default.total.item()) > 1e-2


def test_partial_loss_weights_keep_the_other_defaults():
    config = tiny_config(loss_weights={"rank": 3.0})
    assert config.loss_weights == {**DEFAULT_LOSS_WEIGHTS, "rank": 3.0}
    assert NSALoss(config, gather=False).weights["rank"] == 3.0


# gradients


def test_angular_term_does_not_backpropagate_into_the_ranking_embedding():
    config = tiny_config()
    outs = make_outputs(config, requires_grad=True)
    leaves = outs[0].pop("_leaves")
    out = run_loss(config, outs)
    out.terms["angular"].backward()
    for role in ("anchor", "positive", "negative"):
        assert leaves[(role, "rank")].grad is None, role
    assert all(leaves[(role, "retr")].grad.abs().sum() > 0 for role in ("anchor", "positive", "negative"))


def test_ranking_gradient_of_total_is_unchanged_by_the_angular_term():
    def ranking_and_retrieval_grads(use_angular):
        config = tiny_config(use_angular=use_angular)
        outs = make_outputs(config, requires_grad=True)
        leaves = outs[0].pop("_leaves")
        run_loss(config, outs).total.backward()
        return leaves[("anchor", "rank")].grad, leaves[("anchor", "retr")].grad

    rank_on, retr_on = ranking_and_retrieval_grads(True)
    rank_off, retr_off = ranking_and_retrieval_grads(False)
    assert torch.allclose(rank_on, rank_off, rtol=0, atol=1e-7)
    assert (retr_on - retr_off).abs().max() > 1e-5


# LossOutput helpers and errors


def test_nonfinite_terms_names_the_broken_term():
    config = tiny_config()
    outs = make_outputs(config)
    assert run_loss(config, outs).nonfinite_terms() == []
    outs[1]["spectral"] = outs[1]["spectral"].clone()
    outs[1]["spectral"][0, 0] = float("nan")
    out = run_loss(config, outs)
    assert out.nonfinite_terms() == ["spec"]
    assert not torch.isfinite(out.total)
    outs = make_outputs(config)
    outs[2]["anchor64"] = outs[2]["anchor64"].clone()
    outs[2]["anchor64"][1, 3] = float("inf")
    assert run_loss(config, outs).nonfinite_terms() == ["anchor"]


def test_as_floats():
    config = tiny_config()
    out = run_loss(config, make_outputs(config))
    floats = out.as_floats()
    assert list(floats) == ["loss"] + [f"loss_{t}" for t in LOSS_TERMS]
    assert all(isinstance(v, float) for v in floats.values())
    assert floats["loss"] == pytest.approx(out.total.item())
    for name, value in out.terms.items():
        assert floats[f"loss_{name}"] == pytest.approx(value.item())


def test_empty_batch_raises():
    config = tiny_config()
    empty = tuple({k: (v[:0] if torch.is_tensor(v) else {d: t[:0] for d, t in v.items()}) for k, v in o.items()}
                  for o in make_outputs(config))
    with pytest.raises(ValueError, match="empty batch"):
        run_loss(config, empty)


# temperature schedule


@pytest.mark.parametrize("total", [1000, 37])
def test_temperature_schedule(total):
    c = tiny_config()
    hold = 0.2 * total
    assert temperature_at(0, total, c) == 0.07
    assert temperature_at(int(hold), total, c) == 0.07  # held through exactly 20% of the steps
    assert temperature_at(total, total, c) == pytest.approx(0.05, abs=1e-12)
    assert temperature_at(total - 1, total, c) == pytest.approx(0.05, abs=1e-4)  # last step of 0..total-1
    assert temperature_at(10 * total, total, c) == pytest.approx(0.05, abs=1e-12)
    assert temperature_at(hold + (total - hold) / 2, total, c) == pytest.approx(0.06, abs=1e-12)
    values = [temperature_at(s, total, c) for s in range(total + 1)]
    assert all(b <= a for a, b in zip(values, values[1:]))
    assert all(0.05 - 1e-12 <= v <= 0.07 for v in values)
    assert values[int(hold) + 2] < 0.07  # the cosine part has started


def test_temperature_schedule_exact_values():
    c = tiny_config()
    assert temperature_at(200, 1000, c) == 0.07
    assert temperature_at(600, 1000, c) == pytest.approx(0.06, abs=1e-15)
    assert temperature_at(400, 1000, c) == pytest.approx(0.05 + 0.02 * 0.5 * (1 + math.cos(math.pi / 4)), abs=1e-15)
    assert temperature_at(1000, 1000, c) == pytest.approx(0.05, abs=1e-15)


# end to end with the model

TOKENS = [  # bert-base-uncased WordPiece ids (the default vocabulary)
    [101, 1996, 4937, 2938, 2006, 1996, 13523, 102],  # the cat sat on the mat
    [101, 1037, 3899, 2003, 2652, 102],  # a dog is playing
    [101, 7592, 2088, 102],  # hello world
]


def batch(token_lists):
    S = max(len(t) for t in token_lists)
    ids = torch.zeros(len(token_lists), S, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, t in enumerate(token_lists):
        ids[row, :len(t)], mask[row, :len(t)] = torch.tensor(t), 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_model_through_loss_reaches_every_parameter(pooling):
    """With every term on, each trainable parameter gets a nonzero gradient, for either pooling: the
    ranking head pools all tokens itself, so even under CLS pooling every layer is reached."""
    torch.manual_seed(0)
    config = tiny_config(pooling=pooling)
    model = NSAModel(config).train()
    anchors = batch(TOKENS)
    positives = batch([TOKENS[1], TOKENS[2], TOKENS[0]])
    negatives = batch([TOKENS[2], TOKENS[0][:5], TOKENS[1][:3]])
    out = NSALoss(config, gather=False)(model(**anchors), model(**positives), model(**negatives), temperature=T)
    assert torch.isfinite(out.total) and out.nonfinite_terms() == []
    out.total.backward()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    no_grad = {name for name, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)}
    assert no_grad == set()
    assert any("fractal_weights" in n for n in trainable) and any("spectral_fusion_weight" in n for n in trainable)


TOGGLES = ("use_spectral", "use_anchor64", "use_bridge", "use_matryoshka", "use_angular", "use_fast", "use_rank")


@pytest.fixture(scope="module")
def toggle_batches():
    return batch(TOKENS), batch([TOKENS[1], TOKENS[2], TOKENS[0]]), batch([TOKENS[2], TOKENS[0][:5], TOKENS[1][:3]])


@pytest.mark.parametrize("off", range(2 ** len(TOGGLES)), ids=lambda off: f"off{off:03d}")
def test_unreached_parameters_are_exactly_those_without_gradient(off, toggle_batches):
    """For every combination of the seven toggles, `unreached_parameters` names exactly the parameters
    that autograd leaves without a gradient: the trainer freezes those, so that DistributedDataParallel
    (which stops on a trainable parameter without a gradient) works under every flag."""
    config = tiny_config(**{name: not (off >> i & 1) for i, name in enumerate(TOGGLES)})
    torch.manual_seed(0)
    model = NSAModel(config).train()
    out = NSALoss(config, gather=False)(*(model(**b) for b in toggle_batches), temperature=T)
    out.total.backward()
    without_grad = {name for name, p in model.named_parameters() if p.grad is None}
    assert without_grad == {name for name, _ in model.named_parameters()
                            if name.startswith(unreached_parameters(config))}


def test_one_directional_sem_is_anchor_to_positives_and_negatives_only():
    """`sem_symmetric=False`: L_sem = Σ_dim w_dim · InfoNCE(anchor -> [positives; negatives]); no
    positive -> anchors direction; every other term unchanged."""
    base_config, config = tiny_config(), tiny_config(sem_symmetric=False)
    outs = make_outputs(base_config, seed=3)
    base, one_way = run_loss(base_config, outs), run_loss(config, outs)
    expected = sum(w * hand_info_nce(outs[0]["embedding_semantic"][d], outs[1]["embedding_semantic"][d], T,
                                     outs[2]["embedding_semantic"][d])
                   for d, w in zip(config.sem_dims, config.sem_weights))
    assert abs(one_way.terms["sem"].item() - expected) <= TOL
    assert abs(base.terms["sem"].item() - expected) > 1e-2
    for name in set(base.terms) - {"sem"}:
        assert torch.equal(one_way.terms[name], base.terms[name]), name
