"""Configuration of a Spectra-NSA model and its training run: one dataclass, saved as JSON.

`NSAConfig.from_preset(name, **overrides)` gives the original's four presets (M456, M600, M700, M1B,
shapes unchanged so that their checkpoints load) and two small ones for CPU work: `tiny` (trains in
seconds) and `mini` (the shape of MiniLM-L6: hidden 384, 6 layers, 12 heads).

`estimate_parameters(config)` counts parameters from shapes alone (no allocation: M1B on a laptop), and
`estimate_training_memory(config, ...)` estimates what a training step holds in memory, so that a
notebook can pick the largest preset that fits the GPU it finds.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# the loss terms of SPEC section 5, in logging order
LOSS_TERMS = ("sem", "anchor", "bridge", "fast", "rank", "angular", "spec")
DEFAULT_LOSS_WEIGHTS = {
    "sem": 1.0,  # the per-dimension weights live in `sem_weights`
    "anchor": 0.15,
    "bridge": 0.02,
    "fast": 0.25,
    "rank": 1.0,
    "angular": 0.08,
    "spec": 0.005,
}
PRECISIONS = ("no", "fp16", "bf16")
POOLINGS = ("mean", "cls")
ARCHITECTURES = ("nsa", "bert")


@dataclass
class NSAConfig:
    """Every setting of a model and its training run (SPEC sections 1, 5 and 6).

    Build one with `NSAConfig.from_preset("M456", lr=1e-4)`; save it with `to_json`, read it back with
    `from_json`. Invalid combinations raise `ValueError` naming the field at construction time.
    """

    # --- architecture (SPEC 1-4) ---
    size: str = "M456"
    # "nsa": the original's block (SwiGLU FFN, final LayerNorm). "bert": a pretrained BERT-family encoder's
    # block reproduced exactly (GELU FFN of intermediate_size, embedding LayerNorm with token-type embedding,
    # no final LayerNorm, its epsilon), with spectral-entropy attention added (NSAModel.from_pretrained_encoder)
    architecture: str = "nsa"
    intermediate_size: int | None = None  # the FFN's inner width; None: ff_mult * hidden_size
    layer_norm_eps: float = 1e-5  # of the encoder's LayerNorms (BERT: 1e-12)
    type_vocab_size: int = 0  # token-type embeddings (BERT: 2; only type 0 is used); 0: none
    vocab_size: int = 30522
    max_positions: int = 512
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    ff_mult: int = 4
    dropout: float = 0.1
    spectral_dim: int = 192
    fractal_depth: int = 1
    fractal_init: float = 0.02
    spectral_fusion_init: float = 0.1
    use_spectral: bool = True  # False: plain attention, no spectral path, no fractal term, no L_spec
    learnable_fractal: bool = True
    learnable_spectral_fusion: bool = True
    pooling: str = "mean"
    # the vocabulary the model reads (a Hub id or encoder name); save_pretrained also writes its files
    tokenizer: str = "bert-base-uncased"
    sem_dims: list[int] = field(default_factory=lambda: [768, 512, 256])
    ent_dims: list[int] = field(default_factory=lambda: [384, 192, 96])
    use_anchor64: bool = True
    anchor_dim: int = 64
    retrieval_dim: int = 128
    ranking_dim: int = 1536
    anomalous_dim: int = 2048  # max(1024, 2 * hidden) in the original presets
    num_anomalous_basis: int = 16
    # the model carries a fitted out-of-distribution detector (output `ood_score`; NSAModel.fit_ood)
    ood_detector: bool = False
    gradient_checkpointing: bool = False
    spectral_chunk_size: int = 512  # queries per chunk of the spectral path (bounds its memory)

    # --- losses (SPEC 5) ---
    loss_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LOSS_WEIGHTS))
    sem_weights: list[float] = field(default_factory=lambda: [0.35, 0.30, 0.25])
    use_matryoshka: bool = True  # False: L_sem on the largest semantic dim only
    use_bridge: bool = True
    use_angular: bool = True
    use_fast: bool = True
    use_rank: bool = True
    # the heads other than the semantic one read the pooled vector detached: their losses train the heads
    # only, and the backbone learns from the semantic loss alone (a warm start's default: see nsa_lib.warmstart)
    detach_aux_heads: bool = False
    hard_negatives_in_infonce: bool = True  # False: the original's in-batch positives only
    sem_symmetric: bool = True  # False: L_sem anchor -> [positives; negatives] only (no positive -> anchors)
    triplet_margin: float = 0.3
    temperature_start: float = 0.07
    temperature_end: float = 0.05
    temperature_hold_fraction: float = 0.2

    # --- training (SPEC 6) ---
    max_length: int = 160
    batch_train: int = 8
    grad_accum: int = 8
    mini_batch_size: int | None = None  # sequences per forward pass with GradCache (nsa_lib.gradcache); None: off
    lr: float = 2e-4
    backbone_lr: float | None = None  # learning rate of a warm start's pretrained weights; None: lr
    freeze_backbone_steps: int = 0  # a warm start's pretrained weights stay fixed for this many optimizer steps
    weight_decay: float = 0.05
    # batches of similar-length triplets (less padding, faster steps); False: batches drawn at random, as
    # sentence-transformers draws them (a warm start's default: see nsa_lib.warmstart)
    group_by_length: bool = True
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = 0.08
    max_grad_norm: float = 1.0
    epochs: int = 1
    max_steps: int | None = None
    save_every: int = 500
    backup_every: int = 3000
    eval_every: int = 500
    eval_pairs: int = 200
    health_warmup_steps: int = 5000
    early_stopping_patience: int = 9999
    # in-domain training texts the OOD detector of best/ and final/ is fitted on (0: none fitted)
    ood_fit_texts: int = 2000
    seed: int = 42
    max_train_samples: int | None = 100_000  # None: no cap
    val_ratio: float = 0.02
    precision: str = "no"

    def __post_init__(self):
        self.sem_dims = [int(d) for d in self.sem_dims]
        self.ent_dims = [int(d) for d in self.ent_dims]
        self.sem_weights = [float(w) for w in self.sem_weights]
        self.betas = tuple(float(b) for b in self.betas)
        self.loss_weights = {**DEFAULT_LOSS_WEIGHTS, **{k: float(v) for k, v in self.loss_weights.items()}}
        self.validate()

    # helpers

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        """The FFN's inner width: `intermediate_size`, else ff_mult * hidden_size."""
        return self.intermediate_size or self.ff_mult * self.hidden_size

    @property
    def effective_batch_size(self) -> int:
        return self.batch_train * self.grad_accum

    def validate(self) -> None:
        """Raise `ValueError` naming the first inconsistent setting."""

        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"NSAConfig: {msg}")

        for name in ("vocab_size", "max_positions", "hidden_size", "num_layers", "num_heads", "ff_mult",
                     "anchor_dim", "retrieval_dim", "ranking_dim", "anomalous_dim", "num_anomalous_basis",
                     "max_length", "batch_train", "grad_accum", "spectral_chunk_size"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                 f"{name} must be a positive integer, got {getattr(self, name)!r}")
        need(isinstance(self.ood_fit_texts, int) and self.ood_fit_texts >= 0,
             f"ood_fit_texts must be an integer >= 0, got {self.ood_fit_texts!r}")
        need(self.hidden_size % self.num_heads == 0,
             f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        need(self.spectral_dim > 0, f"spectral_dim must be positive, got {self.spectral_dim}")
        need(self.fractal_depth >= 1, f"fractal_depth must be >= 1, got {self.fractal_depth}")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        need(self.pooling in POOLINGS, f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        need(self.architecture in ARCHITECTURES, f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        need(self.intermediate_size is None or self.intermediate_size > 0,
             f"intermediate_size must be positive or None, got {self.intermediate_size}")
        need(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        need(self.max_length <= self.max_positions,
             f"max_length {self.max_length} exceeds max_positions {self.max_positions}")
        for name in ("sem_dims", "ent_dims"):
            dims = getattr(self, name)
            need(len(dims) >= 1 and all(d > 0 for d in dims), f"{name} must be positive integers, got {dims}")
            need(all(a > b for a, b in zip(dims, dims[1:])),
                 f"{name} must be strictly decreasing (each Matryoshka dim a prefix of the head's "
                 f"{dims[0]}-dim output), got {dims}")
        need(len(self.sem_weights) == len(self.sem_dims),
             f"sem_weights {self.sem_weights} needs one weight per sem_dims entry {self.sem_dims}")
        need(self.ent_dims[-1] <= self.sem_dims[-1],
             f"the bridge compares sem{self.sem_dims[-1]}[:{self.ent_dims[-1]}] with entity{self.ent_dims[-1]}: "
             f"ent_dims[-1] must be <= sem_dims[-1]")
        unknown = set(self.loss_weights) - set(LOSS_TERMS)
        need(not unknown, f"unknown loss terms {sorted(unknown)}; known: {list(LOSS_TERMS)}")
        need(self.temperature_start > 0 and self.temperature_end > 0, "temperatures must be positive")
        need(0.0 <= self.temperature_hold_fraction <= 1.0, "temperature_hold_fraction must be in [0, 1]")
        need(0.0 <= self.val_ratio < 1.0, f"val_ratio must be in [0, 1), got {self.val_ratio}")
        need(self.max_steps is None or self.max_steps > 0, f"max_steps must be positive, got {self.max_steps}")
        need(self.backbone_lr is None or self.backbone_lr > 0, f"backbone_lr must be positive or None, got {self.backbone_lr}")
        need(self.freeze_backbone_steps >= 0, f"freeze_backbone_steps must be >= 0, got {self.freeze_backbone_steps}")
        need(self.mini_batch_size is None or (isinstance(self.mini_batch_size, int) and self.mini_batch_size > 0),
             f"mini_batch_size must be a positive number of sequences or None (off), got {self.mini_batch_size!r}")
        need(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs} (0 epochs would save an untrained model)")
        for name in ("save_every", "eval_every", "backup_every"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0 (0 turns it off), got {getattr(self, name)}")
        need(self.max_train_samples is None or self.max_train_samples >= 1,
             f"max_train_samples must be >= 1 or None (no cap), got {self.max_train_samples}")

    # presets and serialisation

    @classmethod
    def from_preset(cls, name: str = "M456", **overrides: Any) -> "NSAConfig":
        """The preset `name` (case-insensitive) with `overrides` applied, e.g. `from_preset("tiny", lr=1e-3)`."""
        key = preset_name(name)
        if key is None:
            raise ValueError(f"unknown preset {name!r}; choose one of {list(PRESETS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(overrides) - fields)
        if bad:
            raise ValueError(f"unknown NSAConfig field(s) {bad}")
        return cls(**{**PRESETS[key], "size": key, **overrides})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, strict: bool = True) -> "NSAConfig":
        """Build from a dict; with `strict=False` unknown keys are ignored (e.g. an original checkpoint's cfg)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if strict and unknown:
            raise ValueError(f"unknown NSAConfig field(s) {unknown}")
        return cls(**{k: v for k, v in d.items() if k in fields})

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> "NSAConfig":
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            text = Path(path_or_text).read_text()
        return cls.from_dict(json.loads(text))


def preset_name(name) -> str | None:
    """The preset called `name`, case-insensitively ('m456' -> 'M456'), or None."""
    return {k.lower(): k for k in PRESETS}.get(str(name).lower())


def _original_preset(hidden, layers, heads, spectral_dim, max_length, batch, accum, lr):
    return dict(hidden_size=hidden, num_layers=layers, num_heads=heads, spectral_dim=spectral_dim,
                max_length=max_length, batch_train=batch, grad_accum=accum, lr=lr,
                anomalous_dim=max(1024, 2 * hidden))


PRESETS: dict[str, dict[str, Any]] = {
    "M456": _original_preset(1024, 24, 16, 192, 160, 8, 8, 2e-4),
    "M600": _original_preset(1280, 24, 20, 256, 320, 28, 5, 1.8e-4),
    "M700": _original_preset(1536, 24, 24, 384, 384, 24, 6, 1.5e-4),
    "M1B": _original_preset(2048, 32, 32, 512, 512, 16, 8, 1e-4),
    # MiniLM-L6's shape (hidden 384, 6 layers, 12 heads) with the original's heads
    "mini": dict(_original_preset(384, 6, 12, 96, 128, 32, 2, 3e-4), save_every=200, eval_every=200,
                 health_warmup_steps=200),
    # trains in seconds on a CPU; small heads so that the backbone is not dwarfed by them
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, spectral_dim=32, max_length=64,
                 batch_train=16, grad_accum=1, lr=1e-3, sem_dims=[64, 48, 32], ent_dims=[32, 24, 16],
                 anchor_dim=16, retrieval_dim=32, ranking_dim=64, anomalous_dim=128,
                 num_anomalous_basis=8, save_every=50, eval_every=50, health_warmup_steps=50),
}


# --- parameter and memory estimates (shapes only, nothing allocated) ---

def _linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _layernorm(n: int) -> int:
    return 2 * n


def estimate_parameters(config: NSAConfig, *, breakdown: bool = False) -> int | dict[str, int]:
    """The exact number of parameters of `NSAModel(config)`, from shapes alone.

    SwiGLU has three matrices (w1, w2: H->4H, w3: 4H->H); the original's estimator counted two and came
    out ~25% low. With `breakdown=True` returns a dict of counts per part, plus "total".
    """
    H, ds, A, F = config.hidden_size, config.spectral_dim, config.anomalous_dim, config.ffn_size
    attn = 4 * _linear(H, H) + _layernorm(H)
    if config.use_spectral:
        attn += 3 * _linear(H, ds) + _linear(ds, H) + config.fractal_depth + 1
    if config.architecture == "bert":  # GELU FFN (up, down); embedding LayerNorm instead of a final one
        ffn = _linear(H, F) + _linear(F, H) + _layernorm(H)
    else:  # SwiGLU: three matrices
        ffn = 2 * _linear(H, F) + _linear(F, H) + _layernorm(H)
    parts = {
        "embeddings": (config.vocab_size + config.max_positions + config.type_vocab_size) * H + _layernorm(H),
        "layers": config.num_layers * (attn + ffn),
        "sem_head": _linear(H, config.sem_dims[0]) + _layernorm(config.sem_dims[0]),
        "ent_head": _linear(H, config.ent_dims[0]) + _layernorm(config.ent_dims[0]),
        "retrieval": _linear(H, H) + _linear(H, config.retrieval_dim),
        "anchor": (_linear(H, config.anchor_dim) + _layernorm(config.anchor_dim)) if config.use_anchor64 else 0,
        "rank_head": (config.num_anomalous_basis * A
                      + _linear(H, 2 * H) + _layernorm(2 * H) + _linear(2 * H, A) + _layernorm(A)
                      + _linear(A, ds) + _linear(ds, ds) + _layernorm(ds)
                      + _linear(A + ds, config.ranking_dim) + _layernorm(config.ranking_dim)),
    }
    total = sum(parts.values())
    return {**parts, "total": total} if breakdown else total


BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def estimate_training_memory(config: NSAConfig, *, batch_size: int | None = None, seq_len: int | None = None,
                             precision: str = "no", gradient_checkpointing: bool | None = None,
                             sequences_per_example: int = 3) -> dict[str, float]:
    """Bytes a training step holds on a GPU: weights, gradients, AdamW states and activations.

    A micro-batch of `batch_size` triplets is `sequences_per_example * batch_size` sequences of `seq_len`
    tokens. Weights, gradients and the two Adam moments stay fp32 under mixed precision (as `accelerate`
    keeps them); activations are stored in the compute dtype. The activation count follows the tensors
    that autograd saves per block with fused attention kernels (checked against a real forward in the
    tests); with gradient checkpointing only each block's input is kept, plus one block's activations
    during its recompute. On a CPU, short sequences take a path that also keeps the (S, S) scores.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    B = (batch_size or config.batch_train) * sequences_per_example
    S = seq_len or config.max_length
    ckpt = config.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
    act_bytes = 4 if precision == "no" else 2
    H, h, ds, F = config.hidden_size, config.num_heads, config.spectral_dim, config.ffn_size
    n_params = estimate_parameters(config)

    # Floats that autograd saves per token and block, measured with saved-tensor hooks on the fused
    # attention path that GPUs take (tests/test_memory_and_cli.py repeats the measurement): the FFN keeps
    # w1 x, w2 x, silu(w1 x), their product and two H-wide tensors (4F + 2H); the attention block about
    # 19 H (input, q/k/v, the fractal step's q', k', zero-padded v, kernel output, merged heads, residual
    # and LayerNorm) + 4 ds + the spectral sigmoid map (S per token: one head), and about 18 H more per
    # further fractal step; plain attention about 7.5 H + 12 per head.
    if config.use_spectral:
        attn = 19 * H + 4 * ds + S + 18 * H * (2 ** (config.fractal_depth - 1) - 1)
    else:
        attn = 7.5 * H + 12 * h
    per_token_block = attn + 4 * F + 2 * H
    # the block also saves its stacked projection weights (one GEMM for q, k, v, sq, sk, sv and one for o, st)
    width = 3 * H + (3 * ds if config.use_spectral else 0)
    per_block_weights = width * H + H * (H + (ds if config.use_spectral else 0))
    tokens = B * S
    if ckpt:  # block inputs, plus one block recomputed during the backward pass
        activations = tokens * (config.num_layers * H + per_token_block) + per_block_weights
    else:
        activations = tokens * config.num_layers * per_token_block + config.num_layers * per_block_weights
    activations += tokens * (2 * H)  # embeddings and final LN
    out = {
        "parameters": n_params,
        "weights": 4.0 * n_params,
        "gradients": 4.0 * n_params,
        "optimizer": 8.0 * n_params,
        "activations": float(activations * act_bytes),
    }
    out["total"] = out["weights"] + out["gradients"] + out["optimizer"] + out["activations"]
    return out


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def largest_preset_that_fits(memory_bytes: float, *, precision: str = "bf16", headroom: float = 0.85,
                             candidates: tuple[str, ...] = ("M1B", "M700", "M600", "M456", "mini", "tiny"),
                             ) -> tuple[str, bool]:
    """The largest preset whose training step fits in `headroom * memory_bytes`, and whether it needs
    gradient checkpointing to fit. Falls back to the smallest candidate."""
    for name in candidates:
        cfg = NSAConfig.from_preset(name)
        for ckpt in (False, True):
            if estimate_training_memory(cfg, precision=precision, gradient_checkpointing=ckpt)["total"] \
                    <= headroom * memory_bytes:
                return name, ckpt
    return candidates[-1], True


__all__ = ["NSAConfig", "PRESETS", "LOSS_TERMS", "estimate_parameters", "estimate_training_memory",
           "largest_preset_that_fits", "format_bytes"]

