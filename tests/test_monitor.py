"""Health statistics against hand computations, the warnings and their warm-up, early stopping, and the
baseline next to every quick STS check."""
import json
import math

import pytest
import torch

from nsa_lib import NSAConfig, NSAModel
from nsa_lib.data import load_snli_triplets, load_tokenizer, pad_sequences
from nsa_lib.evaluate import baseline_encoder, quick_sts_pairs, sts_spearman
from nsa_lib.monitor import embedding_stats, gradient_stats, health_warnings
from nsa_lib.trainer import Trainer


def outputs(z, anomaly=None, spectral=None):
    B = z.shape[0]
    return {"embedding_semantic": {z.shape[1]: z, 8: z[:, :8]},
            "anomaly_score": anomaly if anomaly is not None else torch.full((B,), 0.5),
            "spectral": spectral if spectral is not None else torch.zeros(B, 4)}


def test_collapsed_embeddings():
    z = torch.nn.functional.normalize(torch.ones(6, 16), dim=-1)
    stats = embedding_stats(outputs(z))
    assert stats["collapse"] == pytest.approx(1.0)
    assert stats["effective_rank"] == pytest.approx(1.0, abs=1e-3)
    assert stats["embedding_std"] == pytest.approx(0.0, abs=1e-6)


def test_orthogonal_embeddings_and_entropy():
    z = torch.eye(8, 16)
    stats = embedding_stats(outputs(z, anomaly=torch.tensor([0.1, 0.3] * 4), spectral=torch.zeros(8, 4)))
    assert stats["collapse"] == pytest.approx(0.0, abs=1e-7)
    # centred, the 8 orthonormal rows span 7 dimensions with equal singular values
    assert stats["effective_rank"] == pytest.approx(7.0, rel=1e-4)
    assert stats["anomaly_mean"] == pytest.approx(0.2) and stats["anomaly_std"] == pytest.approx(
        torch.tensor([0.1, 0.3] * 4).std().item())
    assert stats["spectral_entropy"] == pytest.approx(math.log(4))


def tiny_model_outputs(tokenizer, sentences, *, nan_weights=False):
    """A real forward pass of the tiny preset on `sentences`, its weights all NaN if `nan_weights` (what a
    huge learning rate leaves behind)."""
    torch.manual_seed(0)
    model = NSAModel(NSAConfig.from_preset("tiny")).eval()
    if nan_weights:
        for p in model.parameters():
            p.data.fill_(float("nan"))
    with torch.no_grad():
        return model(**pad_sequences(tokenizer(sentences)["input_ids"]))


@pytest.mark.parametrize("nan_rows, nan_weights, shown", [(3, False, "37.5%"), (0, True, "100%")])
def test_nonfinite_embeddings_are_measured_and_warned_at_any_step(data, nan_rows, nan_weights, shown):
    tokenizer, triplets = data
    out = tiny_model_outputs(tokenizer, [t.anchor for t in triplets[:8]], nan_weights=nan_weights)
    out["embedding_semantic"][64][:nan_rows] = float("nan")  # 3 of 8 sentences NaN: 37.5% of the entries
    stats = embedding_stats(out)  # the SVD of NaN embeddings raised here
    assert stats["nonfinite_embeddings"] == pytest.approx(1.0 if nan_weights else 3 / 8)
    assert all(math.isfinite(v) for v in stats.values())
    assert not {"collapse", "effective_rank", "embedding_std"} & set(stats)
    if not nan_weights:  # the rank head's outputs are still finite and still reported
        assert {"anomaly_mean", "anomaly_std", "spectral_entropy"} <= set(stats)
    config = NSAConfig.from_preset("tiny", health_warmup_steps=5000)
    assert health_warnings({"step": 1, "loss": 1.0, **stats}, config, batch_size=8) == [
        f"non-finite embeddings: {shown} of entries are NaN or infinite"]


def test_finite_model_outputs_report_no_nonfinite_embeddings(data):
    tokenizer, triplets = data
    stats = embedding_stats(tiny_model_outputs(tokenizer, [t.anchor for t in triplets[:8]]))
    assert stats["nonfinite_embeddings"] == 0.0
    assert {"collapse", "effective_rank", "embedding_std", "anomaly_mean", "spectral_entropy"} <= set(stats)
    assert health_warnings({"step": 1, **stats}, NSAConfig.from_preset("tiny"), batch_size=8) == []


def test_gradient_stats_by_hand():
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(2, 2))
    c = torch.nn.Parameter(torch.zeros(1))  # no gradient: ignored
    emb = torch.nn.Parameter(torch.zeros(4, 2))  # an embedding table: in the norms, not in the dead ratio
    a.grad = torch.tensor([3.0, 4.0, 0.0])  # norm 5, one zero
    b.grad = torch.tensor([[0.0, 0.0], [0.0, 1.0]])  # norm 1, three zeros
    emb.grad = torch.zeros(4, 2)
    emb.grad[0, 0] = 3.0  # norm 3
    stats = gradient_stats([("a", a), ("b", b), ("c", c), ("backbone.tok_emb.weight", emb)])
    assert stats["grad_norm_mean"] == pytest.approx(3.0)
    assert stats["grad_norm_std"] == pytest.approx(torch.tensor([5.0, 1.0, 3.0]).std().item())
    assert stats["grad_norm_max"] == pytest.approx(5.0)
    assert stats["dead_grad_ratio"] == pytest.approx(4 / 7)


def test_warnings_wait_for_the_warm_up_and_name_the_problem():
    config = NSAConfig.from_preset("tiny", health_warmup_steps=100)
    sick = {"step": 50, "loss": 1.0, "collapse": 0.97, "effective_rank": 1.0, "embedding_std": 1e-5,
            "dead_grad_ratio": 0.8, "grad_norm_mean": 1.0, "grad_norm_max": 500.0}
    assert health_warnings(sick, config, batch_size=16) == []
    found = health_warnings({**sick, "step": 100}, config, batch_size=16)
    assert len(found) == 5
    assert any("collapse" in w for w in found) and any("effective rank" in w for w in found)
    assert any("80% of gradient entries" in w for w in found) and any("500x the mean" in w for w in found)
    healthy = {"step": 200, "loss": 1.0, "collapse": 0.2, "effective_rank": 12.0, "embedding_std": 0.05,
               "dead_grad_ratio": 0.01, "grad_norm_mean": 1.0, "grad_norm_max": 4.0}
    assert health_warnings(healthy, config, batch_size=16) == []


@pytest.fixture(scope="module")
def data():
    return load_tokenizer(source="offline"), load_snli_triplets("train")[:600]


def test_training_records_carry_health_and_early_stopping_stops(tmp_path, data):
    tokenizer, triplets = data
    scores = iter([0.5, 0.4, 0.45, 0.3, 0.9])
    config = NSAConfig.from_preset("tiny", batch_train=8, max_steps=20, eval_every=2, save_every=100,
                                   early_stopping_patience=3, health_warmup_steps=0, max_length=32)
    trainer = Trainer(config, output_dir=tmp_path, tokenizer=tokenizer, triplets=triplets, show_progress=False,
                      eval_fn=lambda model, tok: {"sts": next(scores)})
    state = trainer.train()
    assert state.stopped_early and state.step == 8  # evals at 2, 4, 6, 8: three without improvement
    assert state.best_sts == 0.5 and state.best_step == 2
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    for key in ("grad_norm_mean", "grad_norm_std", "grad_norm_max", "dead_grad_ratio", "collapse",
                "effective_rank", "embedding_std", "anomaly_mean", "anomaly_std", "spectral_entropy",
                "nonfinite_embeddings", "warnings"):
        assert all(key in r for r in steps), key
    assert steps[0]["spectral_entropy"] == pytest.approx(-steps[0]["loss_spec"], rel=0.05)  # same batch family
    assert [c.name for c in (tmp_path / "checkpoints").iterdir()] == ["ckpt-0000008"]  # saved on stopping


@pytest.mark.slow
def test_quick_check_reports_the_baseline_on_the_same_pairs(tmp_path, data):
    tokenizer, triplets = data
    config = NSAConfig.from_preset("M456", hidden_size=64, num_layers=1, num_heads=4, spectral_dim=16,
                                   anomalous_dim=64, ranking_dim=32, batch_train=8, grad_accum=1, max_steps=2,
                                   eval_every=2, eval_pairs=40, save_every=0, max_length=32)
    Trainer(config, output_dir=tmp_path, tokenizer=tokenizer, triplets=triplets, show_progress=False).train()
    record = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "eval" in line][0]
    expected = sts_spearman(baseline_encoder(), quick_sts_pairs(40))
    assert record["eval"]["baseline_sts"] == pytest.approx(expected, abs=1e-6)
    assert record["eval"]["target_sts"] == 0.825
