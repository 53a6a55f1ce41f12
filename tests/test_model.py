"""NSAModel: shapes and keys, exact parameter counts, padding invariance, checkpointing, bad input."""
import pytest
import torch

from nsa_lib import PRESETS, NSAConfig, NSAModel, estimate_parameters

TOKENS = [101, 7592, 2088, 2003, 1037, 3231, 6251, 1012, 102]  # "[CLS] hello world is a test sentence . [SEP]"


@pytest.fixture(scope="module")
def tiny64():
    torch.manual_seed(0)
    config = NSAConfig.from_preset("tiny", dropout=0.0, fractal_init=0.3)
    return NSAModel(config).double().eval()


def padded_batch(rows, pad_to):
    ids = torch.zeros(len(rows), pad_to, dtype=torch.long)
    mask = torch.zeros(len(rows), pad_to, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


def flat_outputs(out, row=None):
    """Every pooled output as (name, tensor), optionally one row."""
    items = []
    for key, value in out.items():
        if key == "last_hidden_state":
            continue
        if isinstance(value, dict):
            items += [(f"{key}[{d}]", t) for d, t in value.items()]
        else:
            items.append((key, value))
    return [(k, v if row is None else v[row]) for k, v in items]


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("toggles", [{}, {"use_spectral": False}, {"use_anchor64": False}, {"fractal_depth": 3}])
def test_estimate_equals_built_on_meta_device(name, toggles):
    config = NSAConfig.from_preset(name, **toggles)
    with torch.device("meta"):
        model = NSAModel(config)
    assert model.num_parameters() == estimate_parameters(config)


def test_output_keys_and_shapes(tiny64):
    c = tiny64.config
    ids, mask = padded_batch([TOKENS, TOKENS[:4]], 12)
    out = tiny64(input_ids=ids, attention_mask=mask)
    assert set(out) == {"embedding_semantic", "entity", "retrieval128", "anchor64", "anomalous", "spectral",
                        "anomaly_score", "embedding_ranking", "pooled", "last_hidden_state"}
    assert {d: t.shape for d, t in out["embedding_semantic"].items()} == {d: (2, d) for d in c.sem_dims}
    assert {d: t.shape for d, t in out["entity"].items()} == {d: (2, d) for d in c.ent_dims}
    assert out["retrieval128"].shape == (2, c.retrieval_dim)
    assert out["anchor64"].shape == (2, c.anchor_dim)
    assert out["anomalous"].shape == (2, c.anomalous_dim)
    assert out["spectral"].shape == (2, c.spectral_dim)
    assert out["embedding_ranking"].shape == (2, c.ranking_dim)
    assert out["last_hidden_state"].shape == (2, 12, c.hidden_size)
    for key, t in flat_outputs(out):
        if key.startswith(("embedding", "entity", "retrieval", "anchor")):
            assert torch.allclose(t.norm(dim=-1), torch.ones(2, dtype=t.dtype)), key
    assert ((out["anomaly_score"] > 0) & (out["anomaly_score"] < 1)).all()


def test_matryoshka_prefixes_share_direction(tiny64):
    ids, mask = padded_batch([TOKENS], 9)
    sem = tiny64(input_ids=ids, attention_mask=mask)["embedding_semantic"]
    big, small = sem[tiny64.config.sem_dims[0]], sem[tiny64.config.sem_dims[-1]]
    d = small.shape[-1]
    assert torch.allclose(torch.nn.functional.normalize(big[:, :d], dim=-1), small)


def test_anchor_head_absent_when_disabled():
    model = NSAModel(NSAConfig.from_preset("tiny", use_anchor64=False)).eval()
    out = model(input_ids=torch.tensor([TOKENS]))
    assert "anchor64" not in out and model.anchor is None
    assert not any(k.startswith("anchor.") for k in model.state_dict())


def test_padding_and_batchmates_do_not_change_embeddings(tiny64):
    """The original's bug: cosine 0.70 between a sentence alone and padded to 40 tokens."""
    others = [[101, 2054, 102], [101] + [2000 + i for i in range(30)] + [102]]
    ids, mask = padded_batch([TOKENS] + others, 40)
    batched = tiny64(input_ids=ids, attention_mask=mask)
    alone = tiny64(input_ids=torch.tensor([TOKENS]))
    for (key, a), (_, b) in zip(flat_outputs(alone, 0), flat_outputs(batched, 0)):
        assert (a - b).abs().max() <= 1e-6, key
    real = len(TOKENS)
    assert (alone["last_hidden_state"][0] - batched["last_hidden_state"][0, :real]).abs().max() <= 1e-6


def test_padding_invariance_float32():
    torch.manual_seed(1)
    model = NSAModel(NSAConfig.from_preset("tiny", dropout=0.0, fractal_init=0.3)).eval()
    ids, mask = padded_batch([TOKENS, TOKENS[:3]], 40)
    batched = model(input_ids=ids, attention_mask=mask)
    alone = model(input_ids=torch.tensor([TOKENS[:3]]))
    for (key, a), (_, b) in zip(flat_outputs(alone, 0), flat_outputs(batched, 1)):
        assert (a - b).abs().max() <= 1e-5, key


def test_left_padding_equals_right_padding(tiny64):
    right_ids, right_mask = padded_batch([TOKENS], 14)
    left_ids, left_mask = right_ids.roll(5, dims=1), right_mask.roll(5, dims=1)
    right = tiny64(input_ids=right_ids, attention_mask=right_mask)
    left = tiny64(input_ids=left_ids, attention_mask=left_mask)
    assert torch.allclose(right["embedding_semantic"][64], left["embedding_semantic"][64], atol=1e-10)


def test_cls_pooling_uses_first_token():
    torch.manual_seed(0)
    model = NSAModel(NSAConfig.from_preset("tiny", pooling="cls", dropout=0.0)).eval()
    out = model(input_ids=torch.tensor([TOKENS]))
    assert torch.equal(out["pooled"], out["last_hidden_state"][:, 0])


@pytest.mark.parametrize("side", ["left", "right"])
def test_cls_pooling_takes_the_first_real_token_whatever_the_padding(side):
    """Rows of different lengths, padded on either side: each row's CLS embedding equals the sentence's
    embedding alone, and `pooled` is its first real token (under left padding, position 0 is padding)."""
    torch.manual_seed(0)
    model = NSAModel(NSAConfig.from_preset("tiny", pooling="cls", dropout=0.0)).double().eval()
    rows = [TOKENS, TOKENS[:4], [101, 2054, 102]]
    ids, mask = padded_batch(rows, 12)
    if side == "left":  # move each row's real tokens to the end
        for i, r in enumerate(rows):
            ids[i], mask[i] = ids[i].roll(12 - len(r)), mask[i].roll(12 - len(r))
    batched = model(input_ids=ids, attention_mask=mask)
    for i, r in enumerate(rows):
        first = 0 if side == "right" else 12 - len(r)
        assert mask[i, first] == 1 and ids[i, first] == 101
        assert torch.equal(batched["pooled"][i], batched["last_hidden_state"][i, first])
        alone = model(input_ids=torch.tensor([r]))
        for (key, a), (_, b) in zip(flat_outputs(alone, 0), flat_outputs(batched, i)):
            assert (a - b).abs().max() <= 1e-10, (side, i, key)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradient_checkpointing_gives_same_loss_and_grads(dropout):
    """With dropout on too: the recomputed blocks must draw the same masks (the fused CPU attention draws
    its own)."""
    torch.manual_seed(0)
    config = NSAConfig.from_preset("tiny", dropout=dropout)
    plain = NSAModel(config).train()
    ckpt = NSAModel(NSAConfig.from_preset("tiny", dropout=dropout, gradient_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    ids, mask = padded_batch([TOKENS, TOKENS[:5]], 10)
    grads = []
    for model in (plain, ckpt):
        model.zero_grad()
        torch.manual_seed(1)
        out = model(input_ids=ids, attention_mask=mask)
        (out["embedding_ranking"].sum() + out["embedding_semantic"][64].pow(2).sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_autocast_forward_backward_is_finite_and_close(dtype, tol):
    """The mixed-precision path users take on GPUs (autocast; the fractal norms stay fp32), run on the CPU."""
    torch.manual_seed(0)
    model = NSAModel(NSAConfig.from_preset("tiny", dropout=0.0)).train()
    ids, mask = padded_batch([TOKENS, TOKENS[:5]], 10)
    reference = model(input_ids=ids, attention_mask=mask)["embedding_semantic"][64]
    with torch.autocast("cpu", dtype=dtype):
        out = model(input_ids=ids, attention_mask=mask)
        loss = out["embedding_ranking"].float().sum() + out["embedding_semantic"][64].float().pow(2).sum()
    loss.backward()
    assert out["embedding_semantic"][64].dtype == dtype
    assert (out["embedding_semantic"][64].float() - reference).abs().max() < tol
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("ids,mask,match", [
    (torch.tensor(TOKENS), None, r"\(batch, seq\)"),
    (torch.zeros(0, 5, dtype=torch.long), None, "empty batch"),
    (torch.zeros(2, 0, dtype=torch.long), None, "empty batch"),
    (torch.tensor([TOKENS]).float(), None, "integer token ids"),
    (torch.tensor([[101, 30522, 102]]), None, r"token ids must lie in \[0, 30522\)"),
    (torch.tensor([[101, -1, 102]]), None, "min -1"),
    (torch.tensor([[101, 102]]), torch.ones(1, 3), "attention_mask shape"),
    (torch.tensor([[101, 102], [101, 102]]), torch.tensor([[1, 1], [0, 0]]), r"sequence\(s\) \[1\] have no real tokens"),
    (torch.ones(1, 600, dtype=torch.long), None, "exceeds max_positions 512"),
])
def test_bad_input_is_a_clear_error(tiny64, ids, mask, match):
    with pytest.raises(ValueError, match=match):
        tiny64(input_ids=ids, attention_mask=mask)


def test_model_needs_a_config():
    with pytest.raises(TypeError, match="NSAConfig"):
        NSAModel({"hidden_size": 64})
