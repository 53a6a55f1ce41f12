"""NSAConfig: presets, validation, JSON round trip, and the analytic parameter and memory estimates.

The parameter counts of the four original presets are SPEC section 1's real counts; the attention block's
count is checked against a `SpectralEntropyAttention` built on the meta device (nothing allocated).
"""
import dataclasses

import pytest
import torch

from nsa_lib import NSAConfig, NSAModel, SpectralEntropyAttention, estimate_parameters, estimate_training_memory
from nsa_lib.config import PRESETS

# presets


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds(name):
    cfg = NSAConfig.from_preset(name)
    assert cfg.size == name
    for key, value in PRESETS[name].items():
        got = getattr(cfg, key)
        assert (list(got) if isinstance(got, (list, tuple)) else got) == value, key
    assert cfg.hidden_size % cfg.num_heads == 0
    assert cfg.max_length <= cfg.max_positions


@pytest.mark.parametrize("name, hidden, layers, heads, spectral_dim, max_length, batch, accum, lr", [
    ("M456", 1024, 24, 16, 192, 160, 8, 8, 2e-4),
    ("M600", 1280, 24, 20, 256, 320, 28, 5, 1.8e-4),
    ("M700", 1536, 24, 24, 384, 384, 24, 6, 1.5e-4),
    ("M1B", 2048, 32, 32, 512, 512, 16, 8, 1e-4),
])
def test_original_presets_follow_spec_table(name, hidden, layers, heads, spectral_dim, max_length, batch, accum, lr):
    cfg = NSAConfig.from_preset(name)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.spectral_dim, cfg.max_length) == \
        (hidden, layers, heads, spectral_dim, max_length)
    assert (cfg.batch_train, cfg.grad_accum, cfg.lr) == (batch, accum, lr)
    assert cfg.anomalous_dim == max(1024, 2 * hidden)
    assert (cfg.vocab_size, cfg.max_positions, cfg.ff_mult, cfg.dropout, cfg.fractal_depth, cfg.pooling) == \
        (30522, 512, 4, 0.1, 1, "mean")
    assert cfg.sem_dims == [768, 512, 256] and cfg.ent_dims == [384, 192, 96]
    assert (cfg.anchor_dim, cfg.retrieval_dim, cfg.ranking_dim, cfg.num_anomalous_basis) == (64, 128, 1536, 16)


def test_small_presets_exist():
    mini = NSAConfig.from_preset("mini")
    assert (mini.hidden_size, mini.num_layers) == (384, 6)
    tiny = NSAConfig.from_preset("tiny")
    assert tiny.hidden_size < mini.hidden_size and tiny.num_layers <= mini.num_layers


def test_default_config_is_m456():
    assert NSAConfig() == NSAConfig.from_preset("M456")


@pytest.mark.parametrize("spelling", ["m456", "M456", "m1b", "TINY", "Mini"])
def test_preset_names_are_case_insensitive(spelling):
    cfg = NSAConfig.from_preset(spelling)
    canonical = {k.lower(): k for k in PRESETS}[spelling.lower()]
    assert cfg.size == canonical
    assert cfg == NSAConfig.from_preset(canonical)


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="M9000"):
        NSAConfig.from_preset("M9000")


def test_overrides_apply_and_unknown_fields_are_rejected():
    cfg = NSAConfig.from_preset("tiny", lr=5e-3, use_spectral=False)
    assert cfg.lr == 5e-3 and cfg.use_spectral is False
    with pytest.raises(ValueError, match="hiden_size"):
        NSAConfig.from_preset("tiny", hiden_size=64)


# validation


@pytest.mark.parametrize("overrides, message", [
    (dict(hidden_size=100, num_heads=16), r"hidden_size 100 is not divisible by num_heads 16"),
    (dict(sem_dims=[768, 768, 256]), r"sem_dims must be strictly decreasing"),
    (dict(sem_dims=[256, 512, 768]), r"sem_dims must be strictly decreasing"),
    (dict(ent_dims=[384, 192, 192]), r"ent_dims must be strictly decreasing"),
    (dict(ent_dims=[384, 300, 257]), r"ent_dims\[-1\] must be <= sem_dims\[-1\]"),
    (dict(max_length=513), r"max_length 513 exceeds max_positions 512"),
    (dict(precision="fp8"), r"precision must be one of .*'fp8'"),
    (dict(pooling="max"), r"pooling must be one of .*'max'"),
    (dict(num_heads=0), r"num_heads must be a positive integer"),
    (dict(fractal_depth=0), r"fractal_depth must be >= 1"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(loss_weights={"sem": 1.0, "bogus": 2.0}), r"unknown loss terms \['bogus'\]"),
    (dict(sem_weights=[0.5, 0.5]), r"sem_weights .* one weight per sem_dims entry"),
    (dict(epochs=0), r"epochs must be >= 1, got 0"),
    (dict(save_every=-1), r"save_every must be >= 0 \(0 turns it off\), got -1"),
    (dict(eval_every=-5), r"eval_every must be >= 0 \(0 turns it off\), got -5"),
    (dict(backup_every=-1), r"backup_every must be >= 0 \(0 turns it off\), got -1"),
    (dict(max_train_samples=0), r"max_train_samples must be >= 1 or None \(no cap\), got 0"),
])
def test_invalid_settings_raise_helpful_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        NSAConfig.from_preset("M456", **overrides)
    with pytest.raises(ValueError, match=message):  # the constructor validates too, not only from_preset
        NSAConfig(**overrides)


def test_zero_cadences_and_no_sample_cap_are_accepted():
    cfg = NSAConfig.from_preset("tiny", save_every=0, eval_every=0, backup_every=0, max_train_samples=None)
    assert (cfg.save_every, cfg.eval_every, cfg.backup_every, cfg.max_train_samples) == (0, 0, 0, None)


def test_valid_precisions_and_poolings_are_accepted():
    for precision in ("no", "fp16", "bf16"):
        assert NSAConfig.from_preset("tiny", precision=precision).precision == precision
    for pooling in ("mean", "cls"):
        assert NSAConfig.from_preset("tiny", pooling=pooling).pooling == pooling


# JSON round trip


def _non_default_config() -> NSAConfig:
    return NSAConfig.from_preset("tiny", lr=3e-4, betas=(0.8, 0.95), max_steps=123, precision="bf16",
                                 use_spectral=False, fractal_depth=2, loss_weights={"rank": 0.5},
                                 sem_weights=[0.5, 0.3, 0.2], pooling="cls")


def test_json_round_trip_via_file(tmp_path):
    cfg = _non_default_config()
    path = tmp_path / "config.json"
    text = cfg.to_json(path)
    assert path.read_text().strip() == text.strip()
    loaded = NSAConfig.from_json(path)
    assert loaded == cfg
    assert NSAConfig.from_json(str(path)) == cfg
    assert isinstance(loaded.betas, tuple) and loaded.max_steps == 123
    assert loaded.loss_weights["rank"] == 0.5 and loaded.loss_weights["sem"] == 1.0


@pytest.mark.parametrize("name", list(PRESETS))
def test_json_round_trip_via_text(name):
    cfg = NSAConfig.from_preset(name)
    assert NSAConfig.from_json(cfg.to_json()) == cfg
    assert NSAConfig.from_json(_non_default_config().to_json()) == _non_default_config()


def test_from_dict_strictness():
    d = {**NSAConfig.from_preset("tiny").to_dict(), "not_a_field": 1}
    with pytest.raises(ValueError, match="not_a_field"):
        NSAConfig.from_dict(d)
    assert NSAConfig.from_dict(d, strict=False) == NSAConfig.from_preset("tiny")


def test_to_dict_covers_every_field():
    d = NSAConfig.from_preset("tiny").to_dict()
    assert set(d) == {f.name for f in dataclasses.fields(NSAConfig)}


# parameter estimate


ORIGINAL_COUNTS = {"M456": 466_406_896, "M600": 719_202_800, "M700": 1_036_249_328, "M1B": 2_388_144_384}


@pytest.mark.parametrize("name", list(ORIGINAL_COUNTS))
def test_estimate_and_built_model_have_the_originals_exact_count(name):
    """SPEC 1: the original architecture's counts, to the parameter (every Linear with a bias, attn.st too);
    the model is built on the meta device, so M1B allocates nothing."""
    config = NSAConfig.from_preset(name)
    with torch.device("meta"):
        built = NSAModel(config).num_parameters()
    assert estimate_parameters(config) == built == ORIGINAL_COUNTS[name]


@pytest.mark.parametrize("name", list(PRESETS))
def test_estimate_parameters_breakdown_sums_to_total(name):
    cfg = NSAConfig.from_preset(name)
    parts = estimate_parameters(cfg, breakdown=True)
    total = parts.pop("total")
    assert total == estimate_parameters(cfg) == sum(parts.values())
    assert all(v >= 0 for v in parts.values())


def _attention_formula(cfg: NSAConfig) -> int:
    H, ds = cfg.hidden_size, cfg.spectral_dim
    n = 4 * (H * H + H) + 2 * H
    if cfg.use_spectral:
        n += 3 * (ds * H + ds) + (H * ds + H) + cfg.fractal_depth + 1
    return n


def _attention_on_meta(cfg: NSAConfig) -> int:
    with torch.device("meta"):
        att = SpectralEntropyAttention(cfg)
    assert all(p.is_meta for p in att.parameters())  # nothing allocated: works for M1B on a laptop
    return sum(p.numel() for p in att.parameters())


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("overrides", [{}, dict(use_spectral=False), dict(fractal_depth=3),
                                       dict(learnable_fractal=False, learnable_spectral_fusion=False)])
def test_attention_parameter_count(name, overrides):
    cfg = NSAConfig.from_preset(name, **overrides)
    counted = _attention_on_meta(cfg)
    assert counted == _attention_formula(cfg)


def test_estimate_parameters_tracks_attention_options():
    """The whole-model estimate moves by exactly the attention block's change times the layer count."""
    base = NSAConfig.from_preset("M456")
    for overrides in (dict(use_spectral=False), dict(fractal_depth=3)):
        other = NSAConfig.from_preset("M456", **overrides)
        delta = estimate_parameters(base) - estimate_parameters(other)
        assert delta == base.num_layers * (_attention_on_meta(base) - _attention_on_meta(other))
    no_anchor = NSAConfig.from_preset("M456", use_anchor64=False)
    assert estimate_parameters(base) - estimate_parameters(no_anchor) == (1024 * 64 + 64) + 2 * 64


# memory estimate


def test_training_memory_keys_and_weights():
    cfg = NSAConfig.from_preset("M456")
    mem = estimate_training_memory(cfg)
    assert {"weights", "gradients", "optimizer", "activations", "total"} <= set(mem)
    n = estimate_parameters(cfg)
    assert mem["weights"] == 4 * n and mem["gradients"] == 4 * n and mem["optimizer"] == 8 * n
    assert mem["total"] == pytest.approx(mem["weights"] + mem["gradients"] + mem["optimizer"] + mem["activations"])
    assert mem["activations"] > 0


@pytest.mark.parametrize("name", ["tiny", "M456", "M1B"])
def test_training_memory_half_precision_halves_activations(name):
    cfg = NSAConfig.from_preset(name)
    fp32 = estimate_training_memory(cfg, precision="no")
    for precision in ("fp16", "bf16"):
        half = estimate_training_memory(cfg, precision=precision)
        assert half["activations"] == pytest.approx(fp32["activations"] / 2)
        assert half["weights"] == fp32["weights"]  # master weights stay fp32 under mixed precision
        assert half["total"] < fp32["total"]


@pytest.mark.parametrize("name", ["tiny", "M456", "M1B"])
def test_gradient_checkpointing_reduces_activations(name):
    cfg = NSAConfig.from_preset(name)
    plain = estimate_training_memory(cfg, gradient_checkpointing=False)
    ckpt = estimate_training_memory(cfg, gradient_checkpointing=True)
    assert ckpt["activations"] < plain["activations"]
    assert ckpt["weights"] == plain["weights"]
    # the config's own flag is the default
    assert estimate_training_memory(NSAConfig.from_preset(name, gradient_checkpointing=True)) == ckpt


def test_training_memory_grows_with_batch_and_length():
    cfg = NSAConfig.from_preset("M456")
    a2, a4, a8 = (estimate_training_memory(cfg, batch_size=b, seq_len=64)["activations"] for b in (2, 4, 8))
    # linear in the batch: a per-token part plus the per-block stacked projection weights, which do not grow
    assert a8 - a4 == pytest.approx(2 * (a4 - a2))
    assert a4 < a8 < 2 * a4
    per_token_64 = (a4 - a2) / (2 * 3 * 64)
    b2, b4 = (estimate_training_memory(cfg, batch_size=b, seq_len=128)["activations"] for b in (2, 4))
    per_token_128 = (b4 - b2) / (2 * 3 * 128)
    assert per_token_128 > per_token_64  # the spectral sigmoid map keeps S values per token


def test_training_memory_rejects_unknown_precision():
    with pytest.raises(ValueError, match="precision must be one of .*'fp8'"):
        estimate_training_memory(NSAConfig.from_preset("tiny"), precision="fp8")
