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


# SPEC 7's key list, written out: every tensor of an original 0.1.0-alpha state dict and its shape, in
# V vocab, P positions, H hidden, F = ff_mult·H, ds spectral, A anomalous, D fractal depth, S0/E0 the first
# semantic/entity dims, R retrieval, N anchor, K basis vectors, RK ranking; {n} stands for each layer.
# The third column says how the fixture fills it: a weight matrix, a bias, a LayerNorm gain or shift, or
# one of the learnable scalars. Typed from the original's module list, not from NSAModel.
ORIGINAL_KEYS = """
backbone.tok_emb.weight                    V,H        embedding
backbone.pos_emb.weight                    P,H        position
backbone.layers.{n}.attn.q.weight          H,H        matrix
backbone.layers.{n}.attn.q.bias            H          bias
backbone.layers.{n}.attn.k.weight          H,H        matrix
backbone.layers.{n}.attn.k.bias            H          bias
backbone.layers.{n}.attn.v.weight          H,H        matrix
backbone.layers.{n}.attn.v.bias            H          bias
backbone.layers.{n}.attn.o.weight          H,H        matrix
backbone.layers.{n}.attn.o.bias            H          bias
backbone.layers.{n}.attn.sq.weight         ds,H       matrix
backbone.layers.{n}.attn.sq.bias           ds         bias
backbone.layers.{n}.attn.sk.weight         ds,H       matrix
backbone.layers.{n}.attn.sk.bias           ds         bias
backbone.layers.{n}.attn.sv.weight         ds,H       matrix
backbone.layers.{n}.attn.sv.bias           ds         bias
backbone.layers.{n}.attn.st.weight         H,ds       matrix
backbone.layers.{n}.attn.st.bias           H          bias
backbone.layers.{n}.attn.fractal_weights   D          fractal
backbone.layers.{n}.attn.spectral_fusion_weight  -    fusion
backbone.layers.{n}.attn.ln.weight         H          gain
backbone.layers.{n}.attn.ln.bias           H          shift
backbone.layers.{n}.ffn.w1.weight          F,H        matrix
backbone.layers.{n}.ffn.w1.bias            F          bias
backbone.layers.{n}.ffn.w2.weight          F,H        matrix
backbone.layers.{n}.ffn.w2.bias            F          bias
backbone.layers.{n}.ffn.w3.weight          H,F        matrix
backbone.layers.{n}.ffn.w3.bias            H          bias
backbone.layers.{n}.ffn.ln.weight          H          gain
backbone.layers.{n}.ffn.ln.bias            H          shift
backbone.ln.weight                         H          gain
backbone.ln.bias                           H          shift
sem_head.proj.weight                       S0,H       matrix
sem_head.proj.bias                         S0         bias
sem_head.norm.weight                       S0         gain
sem_head.norm.bias                         S0         shift
ent_head.proj.weight                       E0,H       matrix
ent_head.proj.bias                         E0         bias
ent_head.norm.weight                       E0         gain
ent_head.norm.bias                         E0         shift
retr.0.weight                              H,H        matrix
retr.0.bias                                H          bias
retr.2.weight                              R,H        matrix
retr.2.bias                                R          bias
anchor.0.weight                            N,H        matrix
anchor.0.bias                              N          bias
anchor.1.weight                            N          gain
anchor.1.bias                              N          shift
rank_head.anom_basis                       K,A        basis
rank_head.to_anom.0.weight                 2*H,H      matrix
rank_head.to_anom.0.bias                   2*H        bias
rank_head.to_anom.2.weight                 2*H        gain
rank_head.to_anom.2.bias                   2*H        shift
rank_head.to_anom.3.weight                 A,2*H      matrix
rank_head.to_anom.3.bias                   A          bias
rank_head.to_anom.5.weight                 A          gain
rank_head.to_anom.5.bias                   A          shift
rank_head.to_spec.0.weight                 ds,A       matrix
rank_head.to_spec.0.bias                   ds         bias
rank_head.to_spec.2.weight                 ds,ds      matrix
rank_head.to_spec.2.bias                   ds         bias
rank_head.to_spec.3.weight                 ds         gain
rank_head.to_spec.3.bias                   ds         shift
rank_head.out.0.weight                     RK,A+ds    matrix
rank_head.out.0.bias                       RK         bias
rank_head.out.1.weight                     RK         gain
rank_head.out.1.bias                       RK         shift
"""


def original_key_shapes(*, vocab_size, max_positions, hidden_size, num_layers, spectral_dim, sem_dims, ent_dims,
                        anchor_dim, retrieval_dim, ranking_dim, anomalous_dim, num_anomalous_basis,
                        fractal_depth=1, ff_mult=4, **_) -> dict[str, tuple[tuple[int, ...], str]]:
    """ORIGINAL_KEYS for one configuration: key -> (shape, kind), layers expanded."""
    sizes = dict(V=vocab_size, P=max_positions, H=hidden_size, F=ff_mult * hidden_size, ds=spectral_dim,
                 A=anomalous_dim, D=fractal_depth, S0=sem_dims[0], E0=ent_dims[0], R=retrieval_dim, N=anchor_dim,
                 K=num_anomalous_basis, RK=ranking_dim)
    table = {}
    for line in ORIGINAL_KEYS.strip().splitlines():
        key, dims, kind = line.split()
        shape = () if dims == "-" else tuple(int(eval(d, {}, sizes)) for d in dims.split(","))
        for n in (range(num_layers) if "{n}" in key else [None]):
            table[key.format(n=n)] = (shape, kind)
    return table


def original_state_dict(*, seed=0, **shape) -> dict[str, torch.Tensor]:
    """Random float32 weights under SPEC 7's key names and shapes, scaled so activations stay O(1),
    LayerNorms near identity, fractal weights ~0.3 and the fusion weight 0.3 so that both terms matter."""
    g = torch.Generator().manual_seed(seed)
    fill = {
        "embedding": lambda s: torch.randn(s, generator=g),
        "position": lambda s: 0.5 * torch.randn(s, generator=g),
        "matrix": lambda s: torch.randn(s, generator=g) / s[1] ** 0.5,
        "bias": lambda s: 0.1 * torch.randn(s, generator=g),
        "gain": lambda s: 1.0 + 0.2 * torch.randn(s, generator=g),
        "shift": lambda s: 0.1 * torch.randn(s, generator=g),
        "fractal": lambda s: 0.3 + 0.05 * torch.randn(s, generator=g),
        "fusion": lambda s: torch.tensor(0.3),
        "basis": lambda s: 0.1 * torch.randn(s, generator=g),
    }
    return {key: fill[kind](shape) for key, (shape, kind) in original_key_shapes(**shape).items()}


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


def test_folder_saved_before_st_had_a_bias_loads_with_one_warning(tmp_path):
    """A folder written by save_pretrained before attn.st had its bias holds no st.bias: it loads with
    zeros there (what that model computed), and one warning for the whole folder."""
    from safetensors.torch import load_file, save_file

    model = tiny_model()
    folder = model.save_pretrained(tmp_path / "old")
    state = load_file(str(folder / "model.safetensors"))
    dropped = [k for k in state if k.endswith("attn.st.bias")]
    assert len(dropped) == model.config.num_layers
    save_file({k: v for k, v in state.items() if k not in dropped}, str(folder / "model.safetensors"))
    with pytest.warns(UserWarning, match="before attn.st had a bias") as record:
        loaded = NSAModel.from_pretrained(folder)
    assert len([w for w in record if "attn.st" in str(w.message)]) == 1
    for n in range(model.config.num_layers):
        assert torch.equal(loaded.backbone.layers[n].attn.st.bias, torch.zeros(model.config.hidden_size))
    with torch.no_grad():
        for layer in model.backbone.layers:
            layer.attn.st.bias.zero_()
    ids, mask = padded_batch(vocab=model.config.vocab_size)
    with torch.no_grad():
        diffs = max_output_diff(model(input_ids=ids, attention_mask=mask), loaded(input_ids=ids, attention_mask=mask), mask)
    assert max(diffs.values()) == 0.0, diffs


def test_st_bias_reaches_the_output():
    """attn.st's bias is part of the function (SPEC 3): moving it moves every output."""
    model = tiny_model(dropout=0.0)
    ids, mask = padded_batch(vocab=model.config.vocab_size)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask)
        model.backbone.layers[0].attn.st.bias.add_(torch.randn(model.config.hidden_size))  # a constant would
        # shift every dim alike, which the LayerNorm after it removes
        after = model(input_ids=ids, attention_mask=mask)
    diffs = max_output_diff(before, after, mask)
    assert min(diffs[k] for k in ("last_hidden_state", "embedding_semantic[64]", "embedding_ranking")) > 1e-3, diffs
