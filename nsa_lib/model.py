"""The Spectra-NSA encoder and its embedding heads (SPEC sections 2 and 4).

    ids (B, S) -> tok_emb + pos_emb -> dropout -> N x [SpectralEntropyAttention -> SwiGLU FFN] -> LN
               -> pooled p (B, H) -> heads: semantic / entity Matryoshka, retrieval128, anchor64,
                  and the ranking head (anomalous vector, spectral vector, anomaly score, ranking embedding)

Parameter names are the original's (SPEC 7), so its checkpoints load with `load_seed_checkpoint`.
`save_pretrained(dir)` / `NSAModel.from_pretrained(dir)` write and read config.json + model.safetensors,
the layout the Hugging Face Hub expects (a saved folder can be uploaded as it is).

Not handled here: tokenisation (see the data module), token-type embeddings, decoding.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import SpectralEntropyAttention, TokenLayout
from .config import PRESETS, NSAConfig, preset_name
from .safe_load import load_torch_file

logger = logging.getLogger(__name__)

# helpers


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over real tokens: hidden (B, S, H), mask (B, S) 1 = real -> (B, H)."""
    if mask is None:
        return hidden.mean(1)
    m = mask.to(hidden.dtype).unsqueeze(-1)  # (B, S, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def first_real_token(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """CLS pooling: each row's first real token (not position 0, which left padding fills): (B, S, H) -> (B, H)."""
    if mask is None:
        return hidden[:, 0]
    first = mask.int().argmax(1)  # (B,) index of the first 1 (argmax returns the first maximum)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]


# classes


class SwiGLU(nn.Module):
    """LN(x + dropout(w3(silu(w1 x) * w2 x))), inner size ff_mult * hidden."""

    def __init__(self, config: NSAConfig):
        super().__init__()
        H, inner = config.hidden_size, config.ffn_size
        self.w1, self.w2, self.w3 = nn.Linear(H, inner), nn.Linear(H, inner), nn.Linear(inner, H)
        self.dropout = nn.Dropout(config.dropout)
        self.ln = nn.LayerNorm(H, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x + self.dropout(self.w3(F.silu(self.w1(x)) * self.w2(x))))


class GeluFFN(nn.Module):
    """BERT's feed-forward sub-block: LN(x + dropout(down(gelu(up x)))), inner size `intermediate_size`."""

    def __init__(self, config: NSAConfig):
        super().__init__()
        H = config.hidden_size
        self.up, self.down = nn.Linear(H, config.ffn_size), nn.Linear(config.ffn_size, H)
        self.dropout = nn.Dropout(config.dropout)
        self.ln = nn.LayerNorm(H, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x + self.dropout(self.down(F.gelu(self.up(x)))))


class NSABlock(nn.Module):
    def __init__(self, config: NSAConfig):
        super().__init__()
        self.attn = SpectralEntropyAttention(config)
        self.ffn = GeluFFN(config) if config.architecture == "bert" else SwiGLU(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.ffn(self.attn(x, mask))

    def forward_tokens(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        return self.ffn(self.attn.forward_tokens(x, layout))  # x: (T, H), real tokens only


class NSAEncoder(nn.Module):
    """Token + learned position embeddings, `num_layers` blocks, final LayerNorm: (B, S) -> (B, S, H)."""

    def __init__(self, config: NSAConfig):
        super().__init__()
        H, bert = config.hidden_size, config.architecture == "bert"
        self.tok_emb = nn.Embedding(config.vocab_size, H)
        self.pos_emb = nn.Embedding(config.max_positions, H)
        # BERT: + token type 0, LayerNorm on the embeddings, none at the end
        self.type_emb = nn.Embedding(config.type_vocab_size, H) if config.type_vocab_size else None
        self.emb_ln = nn.LayerNorm(H, eps=config.layer_norm_eps) if bert else None
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(NSABlock(config) for _ in range(config.num_layers))
        self.ln = None if bert else nn.LayerNorm(H)
        self.gradient_checkpointing = config.gradient_checkpointing

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, S) ids -> (B, S, H). With padding, every per-token layer runs on the real tokens only (T of
        the B·S positions; the attention core alone sees the padded layout), and the padded positions of
        the result are zero."""
        S = input_ids.shape[1]
        if attention_mask is None:
            positions = torch.arange(S, device=input_ids.device)[None, :].expand_as(input_ids)
            return self._run(self.tok_emb(input_ids) + self.pos_emb(positions), None)
        # count real tokens, so that left padding gives the same positions as right padding
        positions = (attention_mask.long().cumsum(1) - 1).clamp_min(0)
        layout = TokenLayout(attention_mask)
        x = self.tok_emb(layout.unpad(input_ids)) + self.pos_emb(layout.unpad(positions))  # (T, H)
        return layout.pad(self._run(x, layout))

    def _run(self, x: torch.Tensor, layout: TokenLayout | None) -> torch.Tensor:
        if self.type_emb is not None:
            x = x + self.type_emb.weight[0]  # one segment: token type 0 everywhere
        if self.emb_ln is not None:
            x = self.emb_ln(x)
        x = self.dropout(x)
        for block in self.layers:
            step = block.forward_tokens if layout is not None else block.forward
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(step, x, layout, use_reentrant=False)
            else:
                x = step(x, layout)
        return self.ln(x) if self.ln is not None else x


class MatryoshkaHead(nn.Module):
    """z = normalize(LN(proj(p))); returns {d: normalize(z[:d]) for d in dims} (dims decreasing)."""

    def __init__(self, hidden_size: int, dims: list[int]):
        super().__init__()
        self.dims = list(dims)
        self.proj = nn.Linear(hidden_size, self.dims[0])
        self.norm = nn.LayerNorm(self.dims[0])

    def forward(self, pooled: torch.Tensor) -> dict[int, torch.Tensor]:
        z = self.norm(self.proj(pooled))  # (B, dims[0]); normalising z first changes no prefix direction
        return {d: F.normalize(z[:, :d], dim=-1) for d in self.dims}


class RankingHead(nn.Module):
    """The anomalous/OOD head and the ranking embedding (SPEC 4).

    anomalous = to_anom(mean-pooled tokens)                      (B, A)
    spectral  = to_spec(anomalous)                               (B, ds)
    score     = 1 - sigmoid(max_b |anomalous · basis_b|)         (B,)
    ranking   = normalize(out([anomalous * score, spectral]))    (B, ranking_dim)
    """

    def __init__(self, config: NSAConfig):
        super().__init__()
        H, A, ds = config.hidden_size, config.anomalous_dim, config.spectral_dim
        self.anom_basis = nn.Parameter(torch.randn(config.num_anomalous_basis, A) * 0.02)
        self.to_anom = nn.Sequential(nn.Linear(H, 2 * H), nn.GELU(), nn.LayerNorm(2 * H),
                                     nn.Linear(2 * H, A), nn.GELU(), nn.LayerNorm(A))
        self.to_spec = nn.Sequential(nn.Linear(A, ds), nn.Tanh(), nn.Linear(ds, ds), nn.LayerNorm(ds))
        self.out = nn.Sequential(nn.Linear(A + ds, config.ranking_dim), nn.LayerNorm(config.ranking_dim))

    def forward(self, token_mean: torch.Tensor) -> dict[str, torch.Tensor]:
        anomalous = self.to_anom(token_mean)
        spectral = self.to_spec(anomalous)
        score = 1.0 - torch.sigmoid((anomalous @ self.anom_basis.T).abs().amax(-1))  # (B,)
        ranking = F.normalize(self.out(torch.cat([anomalous * score[:, None], spectral], dim=-1)), dim=-1)
        return {"anomalous": anomalous, "spectral": spectral, "anomaly_score": score, "embedding_ranking": ranking}


class OODDetector(nn.Module):
    """How far a text lies from the in-domain texts it was fitted on, as a calibrated score (not in SPEC:
    `anomaly_score`, SPEC's, is trained by the ranking loss only and does not separate in-domain texts from
    out-of-domain ones).

    z     = embedding_semantic at its largest dim (L2-normalised)                 (B, D)
    d2    = ||(z - center) @ whiten||^2: the Mahalanobis distance, `whiten` the inverse square root of the
            fitted texts' covariance shrunk towards its mean variance
    score = sigmoid((d2 - q95) / scale), scale = (q95 - q50) / ln 19               (B,)

    q50 and q95 are the median and 95th percentile of d2 over held-out in-domain texts, so a score is 0.05
    at the in-domain median and 0.5 at its 95th percentile. Computed in float32 whatever the autocast.
    Fitted by `fit_ood_detector`; its buffers are saved with the model.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("center", torch.zeros(dim))
        self.register_buffer("whiten", torch.zeros(dim, dim))
        self.register_buffer("calibration", torch.tensor([0.0, 1.0]))  # q95, scale

    def distance(self, z: torch.Tensor) -> torch.Tensor:
        """The squared Mahalanobis distance d2 of each row of `z` (B, D)."""
        with torch.autocast(z.device.type, enabled=False):
            return ((z.float() - self.center.float()) @ self.whiten.float()).pow(2).sum(-1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        q95, scale = self.calibration.float()
        return torch.sigmoid((self.distance(z) - q95) / scale)


def fit_ood_detector(model: "NSAModel", texts: Sequence[str], calibration_texts: Sequence[str] | None = None, *,
                     shrinkage: float = 0.01, calibration_fraction: float = 0.2, seed: int = 0, batch_size: int = 64,
                     tokenizer=None, show_progress: bool | None = None) -> tuple[OODDetector, dict[str, float]]:
    """An OODDetector for `model`, fitted on in-domain `texts` (deduplicated, at least 50): their center and
    covariance (shrunk by `shrinkage` towards its mean variance). The score is calibrated on
    `calibration_texts` (at least 10), in-domain texts the model was not trained on; without them, on a
    seeded `calibration_fraction` of `texts` held out from the fit. Texts the model was trained on lie
    closer than unseen ones: calibrated on its training texts, a fine-tuned MiniLM put 20% of unseen
    in-domain texts above the 0.5 that should hold 5%. Returns the detector (on the CPU, not attached to
    the model) and what it measured: n_fit, n_calibration, q50, q95 (of d2)."""
    import math
    import random

    texts = list(dict.fromkeys(_checked_texts(texts)))
    held = list(dict.fromkeys(_checked_texts(calibration_texts))) if calibration_texts is not None else None
    if not 0.0 <= shrinkage <= 1.0 or not 0.0 < calibration_fraction < 1.0:
        raise ValueError(f"need 0 <= shrinkage <= 1 and 0 < calibration_fraction < 1, got {shrinkage}, "
                         f"{calibration_fraction}")
    if held is None:
        random.Random(seed).shuffle(texts)
        n_cal = max(10, round(calibration_fraction * len(texts)))
        texts, held = texts[n_cal:], texts[:n_cal]
    if len(texts) < 50 or len(held) < 10:
        raise ValueError(f"fitting the OOD detector needs at least 50 distinct in-domain texts to fit and 10 to "
                         f"calibrate, got {len(texts)} and {len(held)}")
    key = f"embedding_semantic@{max(model.config.sem_dims)}"
    z = model.outputs(texts + held, [key], batch_size=batch_size, tokenizer=tokenizer,
                      show_progress=show_progress)[key]
    fit, held_out = z[:len(texts)].double(), z[len(texts):]
    n_cal = len(held)
    center = fit.mean(0)
    cov = torch.cov((fit - center).T)
    dim = cov.shape[0]
    cov = (1 - shrinkage) * cov + shrinkage * cov.trace() / dim * torch.eye(dim, dtype=cov.dtype)
    values, vectors = torch.linalg.eigh(cov)
    detector = OODDetector(dim)
    detector.center.copy_(center)
    detector.whiten.copy_(vectors * values.clamp_min(1e-12 * float(values.max())).rsqrt())
    d2 = detector.distance(held_out).double()
    q50, q95 = torch.quantile(d2, 0.5).item(), torch.quantile(d2, 0.95).item()
    if not (math.isfinite(q50) and math.isfinite(q95) and torch.isfinite(detector.whiten).all()):
        raise ValueError("the model's embeddings of the in-domain texts are not finite: no OOD detector fitted")
    detector.calibration.copy_(torch.tensor([q95, max((q95 - q50) / math.log(19), 1e-6)]))
    return detector, {"n_fit": len(fit), "n_calibration": n_cal, "q50": q50, "q95": q95}


class NSAModel(nn.Module):
    """The Spectra-NSA sentence encoder with all its heads.

    `model(input_ids=ids, attention_mask=mask)` with ids (B, S) and mask (B, S), 1 = real token, returns a
    dict: `embedding_semantic` {768, 512, 256}, `entity` {384, 192, 96}, `retrieval128`, `anchor64` (if
    enabled), `anomalous`, `spectral`, `anomaly_score`, `embedding_ranking`, `pooled`, `last_hidden_state`,
    and `ood_score` once an OOD detector is fitted (`fit_ood`; a trained run's best/ and final/ have one).
    All embeddings are L2-normalised. A real token's output does not depend on padding or batch-mates.

    Example:
        >>> model = NSAModel(NSAConfig.from_preset("tiny")).eval()
        >>> out = model(input_ids=torch.tensor([[101, 2023, 102]]))
        >>> out["embedding_semantic"][64].shape
        torch.Size([1, 64])
    """

    def __init__(self, config: NSAConfig):
        super().__init__()
        if not isinstance(config, NSAConfig):
            raise TypeError(f"NSAModel needs an NSAConfig, got {type(config).__name__}")
        self.config = config
        H = config.hidden_size
        self.backbone = NSAEncoder(config)
        self.sem_head = MatryoshkaHead(H, config.sem_dims)
        self.ent_head = MatryoshkaHead(H, config.ent_dims)
        self.retr = nn.Sequential(nn.Linear(H, H), nn.GELU(), nn.Linear(H, config.retrieval_dim))
        self.anchor = nn.Sequential(nn.Linear(H, config.anchor_dim), nn.LayerNorm(config.anchor_dim)) \
            if config.use_anchor64 else None
        self.rank_head = RankingHead(config)
        self.ood = OODDetector(max(config.sem_dims)) if config.ood_detector else None
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.config.gradient_checkpointing = enabled
        self.backbone.gradient_checkpointing = enabled

    def pretrained_parameter_names(self) -> list[str]:
        """The parameters a warm start takes from the encoder (architecture 'bert'): the backbone less what
        Spectra-NSA adds to its attention, and the semantic head, which starts as the encoder's own
        embedding. Empty for the original architecture (all trained anew)."""
        if self.config.architecture != "bert":
            return []
        added = (".attn.sq.", ".attn.sk.", ".attn.sv.", ".attn.st.", ".attn.fractal_weights",
                 ".attn.spectral_fusion_weight")
        return [n for n, _ in self.named_parameters()
                if n.startswith("sem_head.") or n.startswith("backbone.") and not any(a in n for a in added)]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _check_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> bool:
        """Validate shapes and values; returns whether the batch has padding. One device sync."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a (batch, seq) tensor of token ids, got {shape}")
        B, S = input_ids.shape
        if B == 0 or S == 0:
            raise ValueError(f"empty batch: input_ids has shape {(B, S)}")
        if input_ids.is_floating_point():
            raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
        if S > self.config.max_positions:
            raise ValueError(f"sequence length {S} exceeds max_positions {self.config.max_positions}; "
                             f"truncate to max_length={self.config.max_length}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {(B, S)}")
        lowest, highest = input_ids.min(), input_ids.max()
        real = torch.full((B,), S, device=input_ids.device) if attention_mask is None else attention_mask.ne(0).sum(1)
        lowest, highest, fewest_real = torch.stack([lowest, highest, real.min().to(lowest.dtype)]).tolist()
        if lowest < 0 or highest >= self.config.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}), got min {lowest}, max {highest}: "
                             f"is the tokenizer's vocabulary the model's?")
        if fewest_real == 0:
            empty = (real == 0).nonzero().flatten().tolist()
            raise ValueError(f"sequence(s) {empty} have no real tokens (attention_mask all zeros)")
        return fewest_real < S

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, Any]:
        has_padding = self._check_inputs(input_ids, attention_mask)
        return self.forward_checked(input_ids, attention_mask.ne(0) if has_padding else None)

    def forward_checked(self, input_ids: torch.Tensor, mask: torch.Tensor | None) -> dict[str, Any]:
        """`forward` without the input checks (which read values back from the device): `mask` a bool
        (B, S) tensor, True = real token, or None for no padding. An all-True mask gives what None gives.
        For callers that have validated their inputs, and for graph export (no data-dependent Python)."""
        hidden = self.backbone(input_ids, mask)  # (B, S, H)
        token_mean = masked_mean(hidden, mask)  # (B, H)
        pooled = first_real_token(hidden, mask) if self.config.pooling == "cls" else token_mean
        out: dict[str, Any] = {"embedding_semantic": self.sem_head(pooled)}
        if self.config.detach_aux_heads:  # same values; the other heads' losses stop at the heads
            pooled_aux, token_mean_aux = pooled.detach(), token_mean.detach()
        else:
            pooled_aux, token_mean_aux = pooled, token_mean
        out["entity"] = self.ent_head(pooled_aux)
        out["retrieval128"] = F.normalize(self.retr(pooled_aux), dim=-1)
        if self.anchor is not None:
            out["anchor64"] = F.normalize(self.anchor(pooled_aux), dim=-1)
        out.update(self.rank_head(token_mean_aux))
        if self.ood is not None:
            out["ood_score"] = self.ood(out["embedding_semantic"][max(self.config.sem_dims)])
        out["pooled"], out["last_hidden_state"] = pooled, hidden
        return out

    def fit_ood(self, texts: Sequence[str], calibration_texts: Sequence[str] | None = None,
                **kwargs: Any) -> dict[str, float]:
        """Fit the out-of-distribution detector on in-domain `texts`, calibrate it on `calibration_texts`
        (in-domain texts the model was not trained on; default: a fifth of `texts`, held out) and attach it:
        from then on the outputs include `ood_score` (0.05 at the in-domain median, 0.5 at its 95th
        percentile; see OODDetector), and `save_pretrained` keeps it. Replaces a detector fitted before.
        `kwargs` go to `fit_ood_detector` (shrinkage, calibration_fraction, seed, batch_size, tokenizer,
        show_progress). Returns n_fit, n_calibration, q50, q95.

        Example:
            >>> model.fit_ood(training_texts, held_out_texts)
            >>> model.encode(["Is this text like the others?"], output="ood_score")
        """
        detector, stats = fit_ood_detector(self, texts, calibration_texts, **kwargs)
        self.attach_ood(detector)
        return stats

    def attach_ood(self, detector: OODDetector | None) -> None:
        """Attach a fitted OODDetector (None: remove the detector); sets `config.ood_detector`."""
        if detector is not None:
            dim = max(self.config.sem_dims)
            if detector.center.shape != (dim,):
                raise ValueError(f"the detector was fitted on {tuple(detector.center.shape)}-dim embeddings; "
                                 f"this model's embedding_semantic is {dim}-dim")
            detector = detector.to(next(self.parameters()).device)
        self.ood = detector
        self.config.ood_detector = detector is not None

    @classmethod
    def from_pretrained_encoder(cls, name_or_path: str | Path, **config_overrides: Any) -> "NSAModel":
        """Spectra-NSA on a pretrained BERT-family encoder (all-MiniLM-L6-v2, bert-base-uncased, BGE, E5, a
        folder): its block reproduced exactly, its weights copied, the spectral path and fractal term at
        zero, the semantic head starting as the encoder's mean-pooled embedding (see nsa_lib.warmstart).
        Returns the model in train mode."""
        return _sibling("warmstart").from_pretrained_encoder(cls, name_or_path, **config_overrides)

    # encoding text

    @property
    def tokenizer(self):
        """The tokenizer this model reads text with: the one saved with it, else the vocabulary its config
        names (`config.tokenizer`: bert-base-uncased for the presets, the encoder of a warm start)."""
        if getattr(self, "_tokenizer", None) is None:
            folder = getattr(self, "_tokenizer_folder", None)
            if folder is not None:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(str(folder))
            elif self.config.tokenizer == "bert-base-uncased":
                self._tokenizer = _sibling("data").load_tokenizer()
            else:
                self._tokenizer = _sibling("warmstart").encoder_tokenizer(self.config.tokenizer)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value) -> None:
        self._tokenizer = value

    @torch.no_grad()
    def outputs(self, texts: Sequence[str], keys: Sequence[str], *, batch_size: int = 64,
                max_length: int | None = None, normalize: bool = True, show_progress: bool | None = None,
                tokenizer=None) -> dict[str, torch.Tensor]:
        """Several outputs of one pass over `texts`, float32 on the CPU, rows in the order of `texts`.

        keys: 'embedding_semantic@512' (a Matryoshka output at one dim), 'embedding_semantic' (its largest
        dim), 'embedding_ranking', 'pooled', 'spectral', 'anomaly_score', 'ood_score' (once fitted), ...
        Texts run in batches of similar length (less padding); `normalize` L2-normalises the vector
        outputs. The train/eval mode is restored
        afterwards. A progress bar shows for more than 2,000 texts unless `show_progress` says otherwise.
        `tokenizer` replaces the model's own for this call."""
        texts = _checked_texts(texts)
        tokenizer, device = tokenizer or self.tokenizer, next(self.parameters()).device
        max_length = max_length or self.config.max_length
        order, restore = length_order(texts)
        chunks: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
        show = len(texts) > 2000 if show_progress is None else show_progress
        was_training = self.training
        self.eval()
        try:
            from tqdm.auto import tqdm

            for start in tqdm(range(0, len(order), batch_size), desc="encoding", unit="batch", disable=not show):
                enc = tokenizer([texts[i] for i in order[start:start + batch_size]], padding=True, truncation=True,
                                max_length=max_length, return_tensors="pt")
                out = self(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device))
                for key in keys:
                    name, _, dim = key.partition("@")
                    value = pick_output(out, name, int(dim) if dim else None).float()
                    if normalize and value.dim() == 2:
                        value = F.normalize(value, dim=-1)
                    chunks[key].append(value.cpu())
        finally:
            self.train(was_training)
        return {k: torch.cat(v)[restore] if v else torch.empty(0) for k, v in chunks.items()}

    def encode(self, texts: str | Sequence[str], output: str = "embedding_semantic", dim: int | None = None, *,
               batch_size: int = 64, normalize: bool = True, convert_to: str = "numpy",
               show_progress: bool | None = None, max_length: int | None = None):
        """Embeddings of `texts` from `output` (for the Matryoshka outputs `dim` picks the width; default the
        largest), as a (N, D) numpy array (`convert_to="numpy"`) or CPU tensor ("torch"); one text gives (D,).

        Example:
            >>> model = NSAModel.from_pretrained("runs/run1/final")
            >>> vectors = model.encode(["A man plays a guitar.", "Someone makes music."], dim=256)
            >>> float(vectors[0] @ vectors[1])   # cosine: the vectors are L2-normalised
        """
        if convert_to not in ("numpy", "torch"):
            raise ValueError(f"convert_to must be 'numpy' or 'torch', got {convert_to!r}")
        single = isinstance(texts, str)
        key = output if dim is None else f"{output}@{dim}"
        result = self.outputs([texts] if single else texts, [key], batch_size=batch_size, max_length=max_length,
                              normalize=normalize, show_progress=show_progress)[key]
        result = result[0] if single else result
        return result.numpy() if convert_to == "numpy" else result

    # persistence: config.json + model.safetensors (+ the tokenizer's files)

    def save_pretrained(self, save_directory: str | Path, tokenizer=None) -> Path:
        """Write config.json and model.safetensors into `save_directory` (created if needed), atomically:
        each file goes to a temporary name first, then is renamed. The tokenizer (`tokenizer`, else the one
        set on or loaded by this model, if any) is saved next to them."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        tokenizer = tokenizer if tokenizer is not None else getattr(self, "_tokenizer", None)
        if tokenizer is None and getattr(self, "_tokenizer_folder", None) is not None:
            tokenizer = self.tokenizer
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder))
        tmp_weights, tmp_config = folder / "model.safetensors.tmp", folder / "config.json.tmp"
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(tmp_weights),
                  metadata={"format": "pt", "library": "nsa_lib"})
        self.config.to_json(tmp_config)
        tmp_weights.replace(folder / "model.safetensors")
        tmp_config.replace(folder / "config.json")
        return folder

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, map_location: str | torch.device = "cpu",
                        **config_overrides: Any) -> "NSAModel":
        """Load a folder written by `save_pretrained`, or a Hub repository of one (`user/name`, downloaded);
        `config_overrides` change non-shape settings (e.g. `dropout=0.0`, `gradient_checkpointing=True`).
        Returns the model in eval mode, its tokenizer the one saved with it."""
        folder = Path(directory).expanduser()
        if not folder.exists() and _looks_like_hub_id(str(directory)):
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(str(directory), allow_patterns=[
                "config.json", "model.safetensors", "tokenizer*", "vocab.txt", "special_tokens_map.json"]))
        for name in ("config.json", "model.safetensors"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder} has no {name}: not a folder written by NSAModel.save_pretrained")
        config = NSAConfig.from_dict({**NSAConfig.from_json(folder / "config.json").to_dict(), **config_overrides})
        model = cls(config)
        state = _with_zero_st_bias(load_file(str(folder / "model.safetensors")), folder)
        load_state_dict_checked(model, state, source=str(folder))
        if (folder / "tokenizer.json").is_file() or (folder / "vocab.txt").is_file():
            model._tokenizer_folder = folder  # loaded on first use
        return model.to(map_location).eval()


def pick_output(outputs: dict[str, Any], name: str, dim: int | None = None) -> torch.Tensor:
    """outputs[name] of a forward pass; for a Matryoshka output (a dict of widths) the width `dim`, default
    the largest. A KeyError names what exists."""
    if name not in outputs:
        hint = " (the model has no OOD detector yet: model.fit_ood(in_domain_texts) fits one)" \
            if name == "ood_score" else ""
        raise KeyError(f"no output {name!r}{hint}; outputs: "
                       f"{sorted(k for k in outputs if k != 'last_hidden_state')}")
    value = outputs[name]
    if isinstance(value, dict):
        dim = max(value) if dim is None else int(dim)
        if dim not in value:
            raise KeyError(f"{name} has dims {sorted(value, reverse=True)}, not {dim}")
        value = value[dim]
    return value


def embedding_keys(config: NSAConfig) -> list[str]:
    """Every embedding output of a model with `config`, Matryoshka dims spelled out (largest first)."""
    keys = [f"embedding_semantic@{d}" for d in config.sem_dims] + [f"entity@{d}" for d in config.ent_dims]
    keys += ["retrieval128"] + (["anchor64"] if config.use_anchor64 else []) + ["embedding_ranking"]
    return keys


def length_order(texts: Sequence[str]) -> tuple[list[int], torch.Tensor]:
    """The indices of `texts`, shortest first (batches of similar length pad less), and the permutation
    that puts rows computed in that order back in the order of `texts`."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    restore = torch.empty(len(order), dtype=torch.long)
    restore[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return order, restore


def _sibling(name: str):
    """The nsa_lib module `name`, imported on first use. Not a `from .name import` statement: an exported
    model (nsa_lib.export, format 'hf') ships this file with only the modules it imports at the top, and
    transformers copies every module such a statement names, wherever it stands."""
    import importlib

    return importlib.import_module(f"{__package__}.{name}")


def _looks_like_hub_id(name: str) -> bool:
    """'user/model' (one slash, no path syntax): a Hub repository id rather than a missing folder."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and " " not in name


def _checked_texts(texts) -> list[str]:
    """`texts` as a list of strings, or a TypeError naming the first item that is not one."""
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)) and not hasattr(texts, "__iter__"):
        raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is {type(text).__name__} ({text!r:.40}), not a string")
    return texts


def encode(model: "NSAModel | str | Path", texts: str | Sequence[str], output: str = "embedding_semantic",
           dim: int | None = None, **kwargs: Any):
    """`NSAModel.encode` for a model, a saved folder or a Hub id (loaded each call: keep the model for many)."""
    if not isinstance(model, NSAModel):
        model = NSAModel.from_pretrained(model)
    return model.encode(texts, output, dim, **kwargs)


def _with_zero_st_bias(state: dict[str, torch.Tensor], folder: Path) -> dict[str, torch.Tensor]:
    """Folders saved before `attn.st` had its bias (nsa_lib 0.2.0.dev0 up to this change) lack `st.bias`;
    a zero bias computes exactly what those models computed. One warning per folder."""
    zeros = {}
    for key, weight in state.items():  # weight (H, ds)
        if key.endswith(".attn.st.weight") and key.removesuffix("weight") + "bias" not in state:
            zeros[key.removesuffix("weight") + "bias"] = weight.new_zeros(weight.shape[0])
    if zeros:
        warnings.warn(f"{folder} was saved before attn.st had a bias: its {len(zeros)} st.bias tensor(s) start at "
                      f"zero, which computes what the saved model computed; save it again to update the folder",
                      stacklevel=3)
    return {**state, **zeros}


def load_state_dict_checked(model: nn.Module, state_dict: dict[str, torch.Tensor], *, source: str) -> None:
    """`load_state_dict(strict=True)` with an error that names the source and the first mismatches."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} shape mismatch(es), e.g. " + "; ".join(wrong[:3]))
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
        raise ValueError(f"{source} does not fit this model configuration: " + ", ".join(parts))
    model.load_state_dict(state_dict, strict=True)


# the original's checkpoints (SPEC 7)

def _config_from_seed_state(state: dict[str, torch.Tensor], cfg: dict[str, Any]) -> NSAConfig:
    """An NSAConfig for an original checkpoint: its `cfg` where it names our fields, shapes from the weights,
    and an error where the two disagree."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise ValueError(f"not a Spectra-NSA checkpoint: its state dict has no {key!r}")
        return tuple(state[key].shape)

    vocab, hidden = shape("backbone.tok_emb.weight")
    layer_ids = {int(k.split(".")[2]) for k in state if k.startswith("backbone.layers.")}
    derived: dict[str, Any] = {
        "vocab_size": vocab, "hidden_size": hidden, "max_positions": shape("backbone.pos_emb.weight")[0],
        "num_layers": len(layer_ids), "ff_mult": shape("backbone.layers.0.ffn.w1.weight")[0] // hidden,
        "use_spectral": "backbone.layers.0.attn.sq.weight" in state,
        "use_anchor64": "anchor.0.weight" in state,
        "retrieval_dim": shape("retr.2.weight")[0], "ranking_dim": shape("rank_head.out.0.weight")[0],
    }
    derived["num_anomalous_basis"], derived["anomalous_dim"] = shape("rank_head.anom_basis")
    derived["spectral_dim"] = shape("rank_head.to_spec.0.weight")[0]
    if derived["use_spectral"]:
        derived["fractal_depth"] = shape("backbone.layers.0.attn.fractal_weights")[0]
    if derived["use_anchor64"]:
        derived["anchor_dim"] = shape("anchor.0.weight")[0]

    fields = set(NSAConfig().to_dict())
    given = {k: v for k, v in cfg.items() if k in fields}
    # the original's use_spectral / use_anchor64 toggled loss terms only: its weights say what was built
    for toggle in ("use_spectral", "use_anchor64"):
        if toggle in given and given[toggle] != derived[toggle]:
            logger.info("checkpoint cfg has %s=%s but its weights %s that part; following the weights",
                        toggle, given[toggle], "have" if derived[toggle] else "lack")
            given.pop(toggle)
    for key, value in derived.items():
        if key in given and given[key] != value:
            raise ValueError(f"checkpoint cfg says {key}={given[key]!r} but its weights have {key}={value!r}: "
                             f"the weights do not belong to this configuration")
    # what the weights' shapes cannot say (num_heads, the smaller Matryoshka dims) comes from the preset
    # that cfg names, else the preset of the same width, else the original's default, M456
    by_name = preset_name(cfg.get("size", ""))
    if "size" in cfg and by_name is None and "num_heads" not in given:
        raise ValueError(f"checkpoint cfg names size {cfg['size']!r}, which is no preset, and no num_heads")
    same_width = [name for name, p in PRESETS.items() if p["hidden_size"] == hidden]
    preset = by_name or (same_width[0] if same_width else "M456")
    merged = {**NSAConfig.from_preset(preset).to_dict(), **given, **derived}
    for key, first in (("sem_dims", shape("sem_head.proj.weight")[0]), ("ent_dims", shape("ent_head.proj.weight")[0])):
        if merged[key][0] != first:
            raise ValueError(f"checkpoint {key} {merged[key]} do not match its head of width {first}"
                             + ("" if key in given else f" (cfg names no {key}; preset {preset}'s were assumed)"))
    return NSAConfig.from_dict(merged, strict=False)


def load_seed_checkpoint(path_or_dict: str | Path | dict, *, map_location: str | torch.device = "cpu",
                         **config_overrides: Any) -> NSAModel:
    """Turn a checkpoint of the original Spectra-NSA 0.1.0-alpha into an `NSAModel` (eval mode).

    Accepts the path of a `torch.save`d dict with `model` (state dict) and `cfg` (the original Config as a
    dict; see SPEC 7), the dict itself, or a bare state dict. The architecture comes from the weights'
    shapes and `cfg`; a contradiction between them, or weights that do not fit, raises `ValueError` naming
    the tensor. `config_overrides` change non-shape settings (e.g. `dropout=0.0`).

    A file is loaded with `torch.load(weights_only=True)`: tensors, plain containers and the numpy types of
    the original's RNG state, nothing that could run code (see `nsa_lib.safe_load`). A file that needs more
    raises `UnsafeFileError` naming them and how to re-save such a file; nothing is ever unpickled in full.
    """
    if isinstance(path_or_dict, (str, Path)):
        path = Path(path_or_dict)
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint at {path}")
        ckpt = load_torch_file(path, what="checkpoint")
        source = str(path)
    else:
        ckpt, source = path_or_dict, "checkpoint dict"
    if not isinstance(ckpt, dict):
        raise ValueError(f"{source}: expected a dict, got {type(ckpt).__name__}")
    state = ckpt.get("model", ckpt)
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{source}: its 'model' entry is not a state dict of tensors")
    cfg = dict(ckpt.get("cfg") or {})
    config = _config_from_seed_state(state, cfg)
    if config_overrides:
        config = NSAConfig.from_dict({**config.to_dict(), **config_overrides})
    model = NSAModel(config)
    load_state_dict_checked(model, {k: v.float() for k, v in state.items()}, source=source)
    return model.to(map_location).eval()
