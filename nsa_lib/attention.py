"""Spectral-Entropy Attention: softmax attention with a learnable "fractal" term, plus a sigmoid
"spectral" side path (SPEC section 3).

Per head, with scores A = Q Kᵀ / √d and real-key mask m, one fractal step is

    P = A diag(m) Aᵀ,   N[i, :] = P[i, :] / max(‖P[i, real j]‖₂, 1e-12),   A ← A + w N.

Forming P costs O(S³). It has rank ≤ d, so this module never forms it:

    P = Q (Kᵀ diag(m) K / d) Qᵀ = Q M Qᵀ                          (M: d×d)
    ‖P[i, real j]‖² = Σ_j m_j (q_iᵀ M q_j)² = q_iᵀ M G M q_i        (G = Qᵀ diag(m) Q: d×d)
    A + w N = [Q/√d , (w/n) ⊙ Q M] · [K , Q]ᵀ

i.e. ordinary attention with the head dimension doubled, which `scaled_dot_product_attention` runs with
its fused kernels (O(S) memory; FlashAttention/cuDNN on a GPU; V zero-padded to the doubled width). A
second step repeats this on the augmented pair (head dim 4d), and so on. The identity is exact
(tests/test_attention.py checks it against the literal O(S³) formula in float64).

This module is the math and the dispatch. On a CPU, depth 1 in fp32/fp64 runs the same algebra as one
hand-fused kernel with a written-out backward, `cpu_attention.FusedSpectralEntropyAttention` (about 1.5x
a plain attention block where this generic path costs ~2x; bench/attention.py); everything else (any
depth, autocast, GPUs) runs `fractal_augment` + `softmax_attention` + `spectral_attention` below.

The spectral path is one sigmoid "head" of width ds: sy = st(sigmoid(qs ksᵀ/√ds)² · vs), masked keys
contributing nothing. It is O(S² ds); for long sequences it runs in query chunks (recomputed in the
backward pass) so that its memory stays O(chunk · S).

Masking (the original's bug, fixed): padding never enters the fractal term, the norms or the spectral
path, so a real token's output does not depend on padding or on batch-mates.

Not handled here: causal masking, key/value caching, cross-attention.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import NSAConfig
from .cpu_attention import FusedSpectralEntropyAttention

# helpers


class _FractalStep(torch.autograd.Function):
    """One fractal step: (q, k) -> ([q, (w/n) ⊙ q M], [k, q]) with M = kᵀk, G = qᵀq,
    n² = rowsum((q M G) ⊙ (q M)); padded rows of q and k must already be zero.

    The backward is written out: autograd through the same graph spends 8 products of cost S·D² per head,
    this one 5 (dG, dM, dR·M, q·dG, k·dM).
    """

    @staticmethod
    def forward(ctx, q, k, w):
        M = k.transpose(-1, -2) @ k  # (B, h, D, D) = Σ_real k kᵀ, so that P = q M qᵀ
        G = q.transpose(-1, -2) @ q  # (B, h, D, D) = Σ_real q qᵀ
        R = q @ M  # (B, h, S, D): row i of P is R_i · qᵀ
        T = R @ G  # (B, h, S, D)
        norm_sq = (T * R).sum(-1, keepdim=True)  # (B, h, S, 1) = ‖P[i, real j]‖²
        inv_norm = norm_sq.clamp_min(1e-24).rsqrt()  # 1 / max(‖·‖, 1e-12)
        ctx.save_for_backward(q, k, w, M, R, T, norm_sq, inv_norm)
        return torch.cat([q, R * (w * inv_norm)], dim=-1), torch.cat([k, q], dim=-1)

    @staticmethod
    def backward(ctx, dq_aug, dk_aug):
        q, k, w, M, R, T, norm_sq, inv_norm = ctx.saved_tensors
        D = q.shape[-1]
        dq_frac = dq_aug[..., D:]
        dc = (dq_frac * R).sum(-1, keepdim=True)  # gradient of the row factor c = w / n
        dw = (dc * inv_norm).sum().reshape(w.shape)
        # c = w · norm_sq^(-1/2) where unclamped, so dc/dnorm_sq = -c / (2 norm_sq) = -w inv³ / 2
        dnorm_sq = (dc * w).mul_(inv_norm.pow(3)).mul_(-0.5).mul_(norm_sq > 1e-24)
        dR = (dq_frac * (w * inv_norm)).add_(T * (2.0 * dnorm_sq))  # norm_sq = diag(R G Rᵀ), G symmetric
        dG = R.transpose(-1, -2) @ (R * dnorm_sq)  # symmetric
        dM = q.transpose(-1, -2) @ dR
        dq = torch.baddbmm((dq_aug[..., :D] + dk_aug[..., D:]).flatten(0, 1), dR.flatten(0, 1), M.flatten(0, 1))
        dq = dq.baddbmm_(q.flatten(0, 1), dG.flatten(0, 1), alpha=2.0).view_as(q)  # + dR M + 2 q dG
        dk = dk_aug[..., :D] + k @ (dM + dM.transpose(-1, -2))
        return dq, dk, dw


def fractal_augment(q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor | None,
                    weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold `len(weights)` fractal steps into an augmented (query, key) pair.

    q, k: (B, h, S, D) with the softmax scale already in q, so that A = q kᵀ. key_mask: (B, S) bool,
    True for real tokens, or None (no padding). Returns q', k' of head dim 2^t·D such that q' k'ᵀ equals
    A after t steps on every (real query, real key) pair; padded rows are zeroed (their scores are masked
    or never read). Runs in float32 at least: the norms are 4th powers of activations and overflow fp16.
    """
    out_dtype = q.dtype
    work_dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        q, k = q.to(work_dtype), k.to(work_dtype)
        if key_mask is not None:  # zero padded rows once: every Gram matrix below then sums real rows only
            m = key_mask[:, None, :, None].to(work_dtype)  # (B, 1, S, 1)
            q, k = q * m, k * m
        for w in weights.to(work_dtype):
            q, k = _FractalStep.apply(q, k, w)
    return q.to(out_dtype), k.to(out_dtype)


# CPU dispatch, measured with bench/attention.py: the hand-fused depth-1 path while B·h·S² stays under
# CPU_FUSED_MAX_SCORES (it keeps F and the probabilities, 2·B·h·S² floats: at most 256 MiB in fp32);
# otherwise `fractal_augment` + `softmax_attention`, which materialises the scores up to
# MATERIALIZED_SCORES_MAX_LEN and uses the fused SDPA kernel beyond.
CPU_FUSED_MAX_SCORES = 1 << 25
MATERIALIZED_SCORES_MAX_LEN = 256


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      key_mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q kᵀ, masked keys -inf) v for q, k (B, h, S, D) and v (B, h, S, d) with D ≥ d; no scaling.

    Fused kernels want equal head dims, so v is padded with zeros to D and the result sliced. On a CPU,
    for short sequences, materialising the (S, S) scores is cheaper than the padded fused kernel
    (measured in bench/attention.py), so that path is taken there.
    """
    D, d = q.shape[-1], v.shape[-1]
    if D != d and q.device.type == "cpu" and q.shape[-2] <= MATERIALIZED_SCORES_MAX_LEN:
        scores = q @ k.transpose(-1, -2)  # (B, h, S, S)
        if key_mask is not None:
            scores = scores.masked_fill_(~key_mask[:, None, None, :], float("-inf"))
        return scores.softmax(-1) @ v
    sdpa_mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, S): True = attend
    if D != d:
        v = F.pad(v, (0, D - d))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, scale=1.0)[..., :d]


class _SigmoidSquaredAttention(torch.autograd.Function):
    """out = sigmoid(qs ksᵀ)² vs for (B, Sq, ds) x (B, S, ds) x (B, S, ds), the scale already in qs.

    Saves only the sigmoid map g (not the scores, not g²) and runs its backward in place:
    d out/d s = 2 g · g (1 - g), so ds = 2 · (dsp ⊙ g²) ⊙ (1 - g) with dsp = dout vsᵀ.
    """

    @staticmethod
    def forward(ctx, qs, ks, vs):
        ks, vs = ks.to(qs.dtype), vs.to(qs.dtype)
        with torch.autocast(qs.device.type, enabled=False):
            g = torch.sigmoid_(qs @ ks.transpose(1, 2))  # (B, Sq, S)
            out = (g * g) @ vs
        ctx.save_for_backward(qs, ks, vs, g)
        return out

    @staticmethod
    def backward(ctx, dout):
        qs, ks, vs, g = ctx.saved_tensors
        sp = g * g
        dvs = sp.transpose(1, 2) @ dout if ctx.needs_input_grad[2] else None
        ds = (dout @ vs.transpose(1, 2)).mul_(sp)  # dsp ⊙ g²
        ds.addcmul_(ds, g, value=-1.0)  # ⊙ (1 - g); the factor 2 goes on the (smaller) results below
        dqs = 2.0 * (ds @ ks) if ctx.needs_input_grad[0] else None
        dks = 2.0 * (ds.transpose(1, 2) @ qs) if ctx.needs_input_grad[1] else None
        return dqs, dks, dvs


def _sigmoid_sq_attention(qs: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor) -> torch.Tensor:
    return _SigmoidSquaredAttention.apply(qs, ks, vs)


def spectral_attention(qs: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, key_mask: torch.Tensor | None,
                       chunk_size: int = 512) -> torch.Tensor:
    """The spectral path's core: sigmoid(qs ksᵀ / √ds)² with masked key columns zeroed, times vs.

    qs, ks, vs: (B, S, ds). Zeroing the masked rows of vs is the same as zeroing the masked columns of
    the sigmoid map, and costs O(S·ds) instead of O(S²). Queries run in chunks of `chunk_size`, each
    recomputed in the backward pass, so that memory stays O(chunk_size · S) for long sequences.
    """
    qs = qs * qs.shape[-1] ** -0.5
    if key_mask is not None:
        vs = vs * key_mask[:, :, None].to(vs.dtype)
    S = qs.shape[1]
    if S <= chunk_size:
        return _sigmoid_sq_attention(qs, ks, vs)
    recompute = torch.is_grad_enabled() and (qs.requires_grad or ks.requires_grad or vs.requires_grad)
    chunks = []
    for start in range(0, S, chunk_size):
        q_chunk = qs[:, start:start + chunk_size]
        if recompute:
            chunks.append(checkpoint(_sigmoid_sq_attention, q_chunk, ks, vs, use_reentrant=False))
        else:
            chunks.append(_sigmoid_sq_attention(q_chunk, ks, vs))
    return torch.cat(chunks, dim=1)


# classes


class SpectralEntropyAttention(nn.Module):
    """One post-LN attention sub-block: LN(x + o(y) + clamp(f, 0, 0.5) · sy).

    `forward(hidden_states (B, S, H), attention_mask (B, S), 1 = real token)` -> (B, S, H).
    With `config.use_spectral=False` it is plain multi-head attention and has no spectral parameters.
    Parameter names follow the original's checkpoints (q, k, v, o, sq, sk, sv, st, fractal_weights,
    spectral_fusion_weight, ln).
    """

    def __init__(self, config: NSAConfig):
        super().__init__()
        H, ds = config.hidden_size, config.spectral_dim
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.use_spectral = config.use_spectral
        self.spectral_chunk_size = config.spectral_chunk_size
        self.q, self.k, self.v, self.o = (nn.Linear(H, H) for _ in range(4))
        self.dropout = nn.Dropout(config.dropout)
        self.ln = nn.LayerNorm(H, eps=config.layer_norm_eps)
        if self.use_spectral:
            self.sq, self.sk, self.sv = (nn.Linear(H, ds) for _ in range(3))
            self.st = nn.Linear(ds, H)
            self.fractal_weights = nn.Parameter(torch.full((config.fractal_depth,), config.fractal_init),
                                                requires_grad=config.learnable_fractal)
            self.spectral_fusion_weight = nn.Parameter(torch.tensor(config.spectral_fusion_init),
                                                       requires_grad=config.learnable_spectral_fusion)

    def _heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, S, 3H) -> q, k, v, each (B, h, S, d) (views)."""
        B, S, _ = qkv.shape
        return qkv.view(B, S, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def _input_projection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The q, k, v (and sq, sk, sv) weights stacked into one GEMM, the softmax scale folded into q."""
        scale = self.head_dim ** -0.5
        linears = [self.q, self.k, self.v] + ([self.sq, self.sk, self.sv] if self.use_spectral else [])
        weight = torch.cat([self.q.weight * scale] + [lin.weight for lin in linears[1:]])
        bias = torch.cat([self.q.bias * scale] + [lin.bias for lin in linears[1:]])
        return weight, bias

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = hidden_states
        if x.dim() != 3 or x.shape[-1] != self.q.in_features:
            raise ValueError(f"hidden_states must be (batch, seq, {self.q.in_features}), got {tuple(x.shape)}")
        B, S, H = x.shape
        key_mask = None
        if attention_mask is not None:
            if attention_mask.shape != (B, S):
                raise ValueError(f"attention_mask must be (batch, seq) = {(B, S)}, got {tuple(attention_mask.shape)}")
            key_mask = attention_mask.bool()
        return self.ln(x + self._output(self._attend(x, key_mask)))

    def forward_tokens(self, x: torch.Tensor, layout: "TokenLayout") -> torch.Tensor:
        """The same block on the real tokens only: x (T, H) are the rows `layout.index` of a padded (B, S)
        batch. The per-token GEMMs run on T rows instead of B·S; only the attention core sees the padded
        layout (padded rows zero, masked as keys, dropped as queries)."""
        return self.ln(x + self._output(layout.unpad(self._attend(x, layout.mask, layout))))

    def _attend(self, x: torch.Tensor, key_mask: torch.Tensor | None,
                layout: "TokenLayout | None" = None) -> torch.Tensor:
        """Hidden states, (B, S, H) or the real tokens of `layout` (T, H) -> (B, S, H [+ ds]): merged heads
        [y, sy] before the output GEMM."""
        B, S = layout.shape if layout is not None else x.shape[:2]
        H = self.q.in_features
        weight, bias = self._input_projection()
        if self._cpu_kernel_applies(x, B, S):
            dropout_p = self.dropout.p if self.training else 0.0
            return FusedSpectralEntropyAttention.apply(
                x, weight, bias, self.fractal_weights[0], key_mask, None if layout is None else layout.index,
                self.num_heads, self.sq.out_features, dropout_p)  # (B, S, H + ds)
        projected = F.linear(x, weight, bias)  # (B, S, 3H [+ 3ds]) or (T, ...)
        if layout is not None:
            projected = layout.pad(projected)
        if not self.use_spectral:
            y = softmax_attention(*self._heads(projected), key_mask)  # (B, h, S, d)
            return self.dropout(y.transpose(1, 2).reshape(B, S, H))
        qkv, *spectral_qkv = projected.split([3 * H] + [self.sq.out_features] * 3, dim=-1)  # its backward: one cat
        q, k, v = self._heads(qkv)
        q, k = fractal_augment(q, k, key_mask, self.fractal_weights)  # (B, h, S, 2^t d)
        y = softmax_attention(q, k, v, key_mask)  # (B, h, S, d)
        sy = spectral_attention(*spectral_qkv, key_mask, self.spectral_chunk_size)  # (B, S, ds)
        return torch.cat([self.dropout(y.transpose(1, 2).reshape(B, S, H)), sy], dim=-1)  # (B, S, H + ds)

    def _cpu_kernel_applies(self, x: torch.Tensor, B: int, S: int) -> bool:
        """The hand-fused kernel runs depth 1, on a CPU, in fp32/fp64 without autocast, while B·h·S² stays
        under CPU_FUSED_MAX_SCORES (it keeps 2·B·h·S² floats for its backward pass)."""
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():  # an ONNX export records the plain ops
            return False
        return (self.use_spectral and self.fractal_weights.shape[0] == 1 and x.device.type == "cpu"
                and x.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled("cpu")
                and B * self.num_heads * S * S <= CPU_FUSED_MAX_SCORES)

    def _output(self, merged: torch.Tensor) -> torch.Tensor:
        """o(y) + clamp(f, 0, 0.5) · st(sy) as one GEMM over [y, sy]."""
        if not self.use_spectral:
            return self.o(merged)
        fusion = self.spectral_fusion_weight.clamp(0.0, 0.5)
        return F.linear(merged, torch.cat([self.o.weight, fusion * self.st.weight], dim=1),
                        self.o.bias + fusion * self.st.bias)


class TokenLayout:
    """Where the real tokens of a padded (B, S) batch are: `index` (T,) into the flattened B·S positions.
    `unpad` takes (B, S, ...) to (T, ...), `pad` puts (T, ...) back with zeros at the padding."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask.bool()  # (B, S)
        self.shape = tuple(mask.shape)
        self.index = self.mask.flatten().nonzero().squeeze(1)  # (T,)

    def unpad(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, *t.shape[2:]).index_select(0, self.index)

    def pad(self, t: torch.Tensor) -> torch.Tensor:
        out = t.new_zeros((self.shape[0] * self.shape[1],) + tuple(t.shape[1:]))
        return out.index_copy(0, self.index, t).view(*self.shape, *t.shape[1:])
