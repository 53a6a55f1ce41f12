"""Importing the original's checkpoints (SPEC 7) and the save_pretrained / from_pretrained round trip.

The checkpoints here are built tensor by tensor from SPEC 7's key list, in the original's top-level
format, without NSAModel: so a loader that only reads back what NSAModel writes would fail them. The
loaded model is compared in float64 with `literal_model_forward`, which computes SPEC 2-4 from the raw
state dict (literal O(S³) fractal term, no nsa_lib code).
"""
import json
import random

import numpy as np
import pytest
import torch

from nsa_lib import NSAConfig, NSAModel, load_seed_checkpoint
from tests.reference import literal_model_forward

# helpers

SMALL = dict(vocab_size=100, max_positions=64, hidden_size=32, num_layers=2, num_heads=4, spectral_dim=16,
             sem_dims=[64, 48, 32], ent_dims=[32, 24, 16], anchor_dim=16, retrieval_dim=16, ranking_dim=48,
             anomalous_dim=64, num_anomalous_basis=4)
LENGTHS = (9, 5, 1, 7)  # right padding of different amounts, one single-token row


def original_state_dict(*, vocab_size, max_positions, hidden_size, num_layers, spectral_dim, sem_dims, ent_dims,
                        anchor_dim, retrieval_dim, ranking_dim, anomalous_dim, num_anomalous_basis,
                        fractal_depth=1, ff_mult=4, seed=0, **_) -> dict[str, torch.Tensor]:
    """Random float32 weights under SPEC 7's key names and shapes, scaled so activations stay O(1),
    LayerNorms near identity, fractal weights ~0.3 and the fusion weight 0.3 so that both terms matter."""
    g = torch.Generator().manual_seed(seed)
    H, ds, A = hidden_size, spectral_dim, anomalous_dim
    sd: dict[str, torch.Tensor] = {}

    def linear(name, n_out, n_in, bias=True):
        sd[f"{name}.weight"] = torch.randn(n_out, n_in, generator=g) / n_in ** 0.5
        if bias:
            sd[f"{name}.bias"] = torch.randn(n_out, generator=g) * 0.1

    def layer_norm(name, n):
        sd[f"{name}.weight"] = 1.0 + 0.2 * torch.randn(n, generator=g)
        sd[f"{name}.bias"] = 0.1 * torch.randn(n, generator=g)

    sd["backbone.tok_emb.weight"] = torch.randn(vocab_size, H, generator=g)
    sd["backbone.pos_emb.weight"] = 0.5 * torch.randn(max_positions, H, generator=g)
    for n in range(num_layers):
        p = f"backbone.layers.{n}"
        for name in "qkvo":
            linear(f"{p}.attn.{name}", H, H)
        for name in ("sq", "sk", "sv"):
            linear(f"{p}.attn.{name}", ds, H)
        linear(f"{p}.attn.st", H, ds, bias=False)
        sd[f"{p}.attn.fractal_weights"] = 0.3 + 0.05 * torch.randn(fractal_depth, generator=g)
        sd[f"{p}.attn.spectral_fusion_weight"] = torch.tensor(0.3)
        layer_norm(f"{p}.attn.ln", H)
        linear(f"{p}.ffn.w1", ff_mult * H, H)
        linear(f"{p}.ffn.w2", ff_mult * H, H)
        linear(f"{p}.ffn.w3", H, ff_mult * H)
        layer_norm(f"{p}.ffn.ln", H)
    layer_norm("backbone.ln", H)
    linear("sem_head.proj", sem_dims[0], H)
    layer_norm("sem_head.norm", sem_dims[0])
    linear("ent_head.proj", ent_dims[0], H)
    layer_norm("ent_head.norm", ent_dims[0])
    linear("retr.0", H, H)
    linear("retr.2", retrieval_dim, H)
    linear("anchor.0", anchor_dim, H)
    layer_norm("anchor.1", anchor_dim)
    sd["rank_head.anom_basis"] = 0.1 * torch.randn(num_anomalous_basis, A, generator=g)
    linear("rank_head.to_anom.0", 2 * H, H)
    layer_norm("rank_head.to_anom.2", 2 * H)
    linear("rank_head.to_anom.3", A, 2 * H)
    layer_norm("rank_head.to_anom.5", A)
    linear("rank_head.to_spec.0", ds, A)
    linear("rank_head.to_spec.2", ds, ds)
    layer_norm("rank_head.to_spec.3", ds)
    linear("rank_head.out.0", ranking_dim, A + ds)
    layer_norm("rank_head.out.1", ranking_dim)
    return sd


def original_checkpoint(*, size="custom", fractal_depth=1, cfg_overrides=None, cfg_drop=(), seed=0) -> dict:
    """The whole dict the original `torch.save`d (SPEC 7), with a cfg in the original's field names,
    including fields nsa_lib does not know (ignored on import) and numpy RNG state (not weights_only-safe).
    `cfg_drop`: cfg fields to leave out (the loader must then take them from the preset `size`)."""
    shape = {**SMALL, "fractal_depth": fractal_depth}
    cfg = {"size": size, "hidden_size": SMALL["hidden_size"], "num_layers": SMALL["num_layers"],
           "num_heads": SMALL["num_heads"], "spectral_dim": SMALL["spectral_dim"], "fractal_depth": fractal_depth,
           "sem_dims": SMALL["sem_dims"], "ent_dims": SMALL["ent_dims"], "anchor_dim": SMALL["anchor_dim"],
           "max_length": 48, "batch_train": 8, "grad_accum": 8, "lr": 2e-4, "dropout": 0.1,
           "use_anchor64": True, "output_dir": "/content/drive/MyDrive/nsa", "use_fp16": False,
           **(cfg_overrides or {})}
    cfg = {k: v for k, v in cfg.items() if k not in cfg_drop}
    return {
        "model": original_state_dict(**shape, seed=seed),
        "opt": {}, "lr_sched": {}, "cfg": cfg, "step": 1500, "best_sts": 0.61, "best_val_loss": 2.3,
        "epoch": 0, "checkpoint_counter": 3, "patience_counter": 0,
        "rng_state": {"python": random.getstate(), "numpy": np.random.get_state(),
                      "torch": torch.get_rng_state()},
    }


def padded_batch(lengths=LENGTHS, vocab=SMALL["vocab_size"], seed=1):
    g = torch.Generator().manual_seed(seed)
    S = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), S), generator=g)
    mask = torch.zeros(len(lengths), S, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    return ids * mask, mask  # pad id 0


def max_output_diff(ours: dict, ref: dict, mask: torch.Tensor) -> dict[str, float]:
    """Largest |difference| per output key (per Matryoshka dim); last_hidden_state on real tokens only."""
    assert set(ours) == set(ref)
    diffs = {}
    for key, value in ref.items():
        if isinstance(value, dict):
            assert set(ours[key]) == set(value), key
            for dim in value:
                diffs[f"{key}[{dim}]"] = (ours[key][dim] - value[dim]).abs().max().item()
        elif key == "last_hidden_state":
            diffs[key] = (ours[key][mask.bool()] - value[mask.bool()]).abs().max().item()
        else:
            diffs[key] = (ours[key] - value).abs().max().item()
    return diffs


def assert_matches_literal(model: NSAModel, state: dict, cfg: dict, tol=1e-6):
    ids, mask = padded_batch()
    model = model.double()
    double_state = {k: v.double() for k, v in state.items()}
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask)
        ref = literal_model_forward(double_state, cfg, ids, mask)
    diffs = max_output_diff(ours, ref, mask)
    assert max(diffs.values()) <= tol, {k: v for k, v in diffs.items() if v > tol}
    return ours, ref


# the original's checkpoint format


PRESET_FIELDS = ("num_heads", "sem_dims", "ent_dims", "max_length")


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("size", ["custom", "tiny"])
def test_original_checkpoint_file_matches_literal_spec(tmp_path, depth, size):
    """cfg size 'custom' is no preset (num_heads etc. must come from cfg); with size 'tiny' the cfg leaves
    num_heads and the Matryoshka dims out and the preset supplies them."""
    ckpt = original_checkpoint(size=size, fractal_depth=depth, cfg_drop=PRESET_FIELDS if size == "tiny" else ())
    assert size == "custom" or "num_heads" not in ckpt["cfg"]
    path = tmp_path / "nsa_checkpoint.pt"
    torch.save(ckpt, path)
    model = load_seed_checkpoint(path)
    assert not model.training
    c = model.config
    assert (c.hidden_size, c.num_layers, c.num_heads, c.spectral_dim, c.fractal_depth) == (32, 2, 4, 16, depth)
    assert (c.sem_dims, c.ent_dims, c.anchor_dim, c.retrieval_dim, c.ranking_dim) == ([64, 48, 32], [32, 24, 16],
                                                                                       16, 16, 48)
    assert (c.anomalous_dim, c.num_anomalous_basis, c.vocab_size, c.max_positions) == (64, 4, 100, 64)
    assert model.num_parameters() == sum(t.numel() for t in ckpt["model"].values())
    ours, _ = assert_matches_literal(model, ckpt["model"], {**SMALL, **ckpt["cfg"]})
    assert not torch.equal(ours["embedding_ranking"][0], ours["embedding_ranking"][1])  # non-degenerate


def test_comparison_is_sensitive_to_the_fractal_term_and_the_heads():
    """Guards the tests above against vacuity: a different fractal weight or head count moves the outputs."""
    ckpt = original_checkpoint(fractal_depth=1)
    ids, mask = padded_batch()
    state = {k: v.double() for k, v in ckpt["model"].items()}
    base = literal_model_forward(state, ckpt["cfg"], ids, mask)
    no_fractal = {**state, **{f"backbone.layers.{n}.attn.fractal_weights": torch.zeros(1, dtype=torch.float64)
                              for n in range(2)}}
    other_heads = literal_model_forward(state, {**ckpt["cfg"], "num_heads": 8}, ids, mask)
    for changed in (literal_model_forward(no_fractal, ckpt["cfg"], ids, mask), other_heads):
        assert max(max_output_diff(changed, base, mask).values()) > 1e-3


def test_custom_size_without_num_heads_raises():
    with pytest.raises(ValueError, match="num_heads"):
        load_seed_checkpoint(original_checkpoint(size="custom", cfg_drop=("num_heads",)))


def test_cfg_num_heads_is_used():
    ckpt = original_checkpoint(cfg_overrides={"num_heads": 8})
    model = load_seed_checkpoint(ckpt)
    assert model.config.num_heads == 8
    assert_matches_literal(model, ckpt["model"], ckpt["cfg"])


def test_loads_from_dict_and_file_alike(tmp_path):
    ckpt = original_checkpoint(fractal_depth=2)
    torch.save(ckpt, tmp_path / "c.pt")
    from_dict, from_file = load_seed_checkpoint(ckpt), load_seed_checkpoint(tmp_path / "c.pt")
    assert from_dict.config.to_dict() == from_file.config.to_dict()
    for (name, a), (_, b) in zip(from_dict.state_dict().items(), from_file.state_dict().items()):
        assert torch.equal(a, b), name
    assert_matches_literal(from_dict, ckpt["model"], ckpt["cfg"])


def test_loads_a_weights_only_safe_file(tmp_path):
    """A checkpoint without numpy state loads through torch.load(weights_only=True)."""
    ckpt = original_checkpoint()
    ckpt["rng_state"] = {"torch": torch.get_rng_state()}
    torch.save(ckpt, tmp_path / "c.pt")
    assert_matches_literal(load_seed_checkpoint(str(tmp_path / "c.pt")), ckpt["model"], ckpt["cfg"])


def test_bare_state_dict_of_the_default_presets_head_shapes_loads_with_its_heads():
    """No cfg: the default preset M456 fills in num_heads (16), sem_dims and ent_dims. Here the heads have
    M456's widths (768 / 384) on a 32-wide backbone, which 16 heads divide."""
    shape = {**SMALL, "max_positions": 512, "sem_dims": [768, 512, 256], "ent_dims": [384, 192, 96]}
    state = original_state_dict(**shape)
    model = load_seed_checkpoint(state)
    assert model.config.num_heads == 16 and model.config.sem_dims == [768, 512, 256]
    assert_matches_literal(model, state, {"num_heads": 16, "sem_dims": [768, 512, 256], "ent_dims": [384, 192, 96]})


def test_bare_state_dict_of_a_small_shape_raises_clearly():
    """Without cfg the Matryoshka dims default to M456's [768, 512, 256], which a 64-wide head contradicts."""
    with pytest.raises(ValueError, match="sem_dims"):
        load_seed_checkpoint(original_state_dict(**SMALL))


def test_config_overrides_apply():
    model = load_seed_checkpoint(original_checkpoint(), dropout=0.0, gradient_checkpointing=True)
    assert model.config.dropout == 0.0 and model.config.gradient_checkpointing


# errors


def test_cfg_contradicting_the_weights_names_the_field():
    with pytest.raises(ValueError, match="hidden_size"):
        load_seed_checkpoint(original_checkpoint(cfg_overrides={"hidden_size": 64}))
    with pytest.raises(ValueError, match="fractal_depth"):
        load_seed_checkpoint(original_checkpoint(fractal_depth=2, cfg_overrides={"fractal_depth": 1}))


def test_cfg_sem_dims_contradicting_the_head_raises():
    with pytest.raises(ValueError, match="sem_dims"):
        load_seed_checkpoint(original_checkpoint(cfg_overrides={"sem_dims": [128, 64, 32]}))


@pytest.mark.parametrize("key", ["backbone.layers.1.attn.sv.bias", "rank_head.to_spec.3.weight", "retr.2.weight",
                                 "backbone.tok_emb.weight"])
def test_missing_key_is_named(key):
    ckpt = original_checkpoint()
    del ckpt["model"][key]
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_seed_checkpoint(ckpt)


def test_unexpected_key_is_named():
    ckpt = original_checkpoint()
    ckpt["model"]["backbone.layers.0.attn.extra.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"backbone\.layers\.0\.attn\.extra\.weight"):
        load_seed_checkpoint(ckpt)


@pytest.mark.parametrize("key, shape", [("backbone.layers.1.ffn.w3.bias", (31,)),
                                        ("backbone.layers.0.attn.q.weight", (32, 16)),
                                        ("rank_head.to_anom.3.weight", (64, 32))])
def test_wrong_shape_is_named(key, shape):
    ckpt = original_checkpoint()
    ckpt["model"][key] = torch.zeros(shape)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as err:
        load_seed_checkpoint(ckpt)
    assert "shape mismatch" in str(err.value)


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_seed_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize("payload", [[1, 2, 3], torch.zeros(3)])
def test_non_dict_file_raises_value_error(tmp_path, payload):
    torch.save(payload, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="expected a dict"):
        load_seed_checkpoint(tmp_path / "c.pt")


def test_model_entry_that_is_no_state_dict_raises():
    with pytest.raises(ValueError, match="state dict"):
        load_seed_checkpoint({"model": {"backbone.tok_emb.weight": [1, 2]}, "cfg": {}})


# save_pretrained / from_pretrained


def tiny_model(seed=0, **overrides) -> NSAModel:
    torch.manual_seed(seed)
    return NSAModel(NSAConfig.from_preset("tiny", **overrides)).eval()


def test_save_pretrained_round_trip(tmp_path):
    model = tiny_model(fractal_depth=2)
    folder = model.save_pretrained(tmp_path / "saved")
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors"}
    assert json.loads((folder / "config.json").read_text())["fractal_depth"] == 2
    loaded = NSAModel.from_pretrained(folder)
    assert not loaded.training and loaded.config.to_dict() == model.config.to_dict()
    ids, mask = padded_batch(vocab=model.config.vocab_size)
    with torch.no_grad():
        a, b = model(input_ids=ids, attention_mask=mask), loaded(input_ids=ids, attention_mask=mask)
    diffs = max_output_diff(a, b, mask)
    assert max(diffs.values()) == 0.0, diffs


def test_from_pretrained_overrides(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    assert NSAModel.from_pretrained(tmp_path, dropout=0.0).config.dropout == 0.0
    with pytest.raises(ValueError, match="shape mismatch"):
        NSAModel.from_pretrained(tmp_path, spectral_dim=16)


def test_from_pretrained_of_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        NSAModel.from_pretrained(tmp_path)


def test_from_pretrained_with_weights_of_another_shape(tmp_path):
    tiny_model().save_pretrained(tmp_path / "a")
    tiny_model(spectral_dim=16).save_pretrained(tmp_path / "b")
    (tmp_path / "a" / "model.safetensors").replace(tmp_path / "b" / "model.safetensors")
    with pytest.raises(ValueError, match="shape mismatch"):
        NSAModel.from_pretrained(tmp_path / "b")
