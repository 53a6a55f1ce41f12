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

Two implementations of the same algebra:
- `fractal_augment` + `softmax_attention`: any depth, any device, autocast; the GPU path.
- `_FractalSoftmaxAttention`: depth 1 on a CPU in fp32/fp64, fused by hand (one GEMM for the scores,
  no padded V, cache-sized blocks, a written-out backward); 1.5-1.7x a plain attention block where the
  generic path costs ~2x (bench/attention.py).

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


def _blocks(BH: int, S: int, budget: int) -> list[tuple[slice, slice]]:
    """(heads, queries) blocks whose (S, S)-row slice of scores holds about `budget` floats."""
    rows = max(1, min(S, budget // S))  # query rows of one head per block
    heads = max(1, min(BH, budget // (rows * S)))
    return [(slice(g, g + heads), slice(r, r + rows)) for g in range(0, BH, heads) for r in range(0, S, rows)]


class _FractalSoftmaxAttention(torch.autograd.Function):
    """softmax(q kᵀ + w N, masked keys -inf) v for fractal_depth 1, fused by hand for the CPU.

    The same exact algebra as `fractal_augment` + `softmax_attention`. On a CPU the cost of attention is
    memory traffic over (S, S) tensors more than arithmetic, so: the scores are one GEMM
    [q, c ⊙ R] · [k, q]ᵀ written straight into the buffer that keeps the probabilities, masked and
    soft-maxed in place; long sequences run in blocks of (heads, query rows) that stay in cache; V is
    never zero-padded; the backward is written out (6 S²·d products for the core, 5 S·d² for the fractal
    term) and reuses one workspace across blocks. The probabilities are kept for the backward pass (no
    recomputation), which is why this path is bounded by CPU_FUSED_MAX_SCORES.
    qkv: (B, S, 3H) as projected (q with the softmax scale folded in); w: 0-dim; key_mask: (B, S) bool or
    None. Returns y (B, h, S, d); the gradient of qkv comes back as one contiguous (B, S, 3H) tensor.
    """

    BLOCK_FLOATS = 1 << 20  # 4 MiB of fp32 scores per block

    @staticmethod
    def forward(ctx, qkv, w, key_mask, num_heads):
        B, S, H3 = qkv.shape
        h, d = num_heads, H3 // (3 * num_heads)
        BH = B * h
        # one copy from the projection's (B, S, 3, h, d) layout to three head-major (BH, S, d) tensors
        q3, k3, v3 = qkv.view(B, S, 3, h, d).permute(2, 0, 3, 1, 4).reshape(3, BH, S, d).unbind(0)
        if key_mask is None:
            qm, km, bias = q3, k3, None
        else:
            real = key_mask.repeat_interleave(h, dim=0)  # (BH, S)
            m3 = real[:, :, None].to(qkv.dtype)
            qm, km = q3 * m3, k3 * m3
            bias = torch.zeros(BH, 1, S, dtype=qkv.dtype, device=qkv.device).masked_fill_(~real[:, None, :], float("-inf"))
        M = km.transpose(1, 2) @ km  # (BH, d, d) = Σ_real k kᵀ, so that P = q M qᵀ
        G = qm.transpose(1, 2) @ qm  # (BH, d, d) = Σ_real q qᵀ
        R = q3 @ M  # (BH, S, d)
        T = R @ G  # (BH, S, d)
        norm_sq = torch.linalg.vecdot(T, R).unsqueeze(-1)  # (BH, S, 1) = ‖P[i, real j]‖²
        inv_norm = norm_sq.clamp_min(1e-24).rsqrt()
        cR = R * (w * inv_norm)  # (BH, S, d): the fractal half of the augmented query
        blocks = _blocks(BH, S, _FractalSoftmaxAttention.BLOCK_FLOATS)
        ctx.blocks = blocks
        q_aug = torch.cat([q3, cR], dim=-1)  # (BH, S, 2d): [q, c ⊙ R]
        kT_aug = torch.cat([k3.transpose(1, 2), q3.transpose(1, 2)], dim=1)  # (BH, 2d, S): [k, q]ᵀ
        if len(blocks) == 1:  # small enough to stay in cache whole
            probs = torch.bmm(q_aug, kT_aug)  # (BH, S, S) scores
            if bias is not None:
                probs.add_(bias)
            torch.ops.aten._softmax.out(probs, -1, False, out=probs)  # in place (the kernel reads a row before writing it)
            ctx.save_for_backward(q3, k3, v3, qm, km, w, M, R, T, norm_sq, inv_norm, q_aug[..., d:], probs)
            ctx.num_heads = h
            return (probs @ v3).view(B, h, S, d)
        keep = any(ctx.needs_input_grad)
        probs = torch.empty(BH, S, S, dtype=qkv.dtype, device=qkv.device) if keep else None
        work = None if keep else torch.empty(_block_numel(blocks, S), dtype=qkv.dtype, device=qkv.device)
        y = torch.empty(BH, S, d, dtype=qkv.dtype, device=qkv.device)
        for g, r in blocks:  # a block (heads g, rows r) of probs is contiguous: rows < S only for one head
            p = probs[g, r] if keep else _view(work, q_aug[g, r].shape[:2] + (S,))
            torch.bmm(q_aug[g, r], kT_aug[g], out=p)  # (heads, rows, S) scores
            if bias is not None:
                p.add_(bias[g])
            torch.ops.aten._softmax.out(p, -1, False, out=p)  # in place (the kernel reads a row before writing it)
            torch.bmm(p, v3[g], out=y[g, r])
        ctx.save_for_backward(q3, k3, v3, qm, km, w, M, R, T, norm_sq, inv_norm, q_aug, probs)
        ctx.num_heads = h
        return y.view(B, h, S, d)

    @staticmethod
    def backward(ctx, dy):
        q3, k3, v3, qm, km, w, M, R, T, norm_sq, inv_norm, q_aug, probs = ctx.saved_tensors
        BH, S, d = q3.shape
        dy3 = dy.reshape(BH, S, d)
        if len(ctx.blocks) == 1:
            dq, dk, dv, dcR = _core_backward_whole(dy3, q3, k3, v3, q_aug, probs)
        else:
            dq, dk, dv, dcR = _core_backward_blocked(dy3, q3, k3, v3, q_aug, probs, ctx.blocks)
        # c ⊙ R with c = w / max(‖P_i‖, 1e-12) and ‖P_i‖² = R_i G R_iᵀ
        dc = torch.linalg.vecdot(dcR, R).unsqueeze(-1)
        dw = (dc * inv_norm).sum().reshape(w.shape)
        dnorm_sq = (dc * w).mul_(inv_norm.pow(3)).mul_(-0.5).mul_(norm_sq > 1e-24)
        dR = (dcR * (w * inv_norm)).add_(T * (2.0 * dnorm_sq))
        dG = R.transpose(1, 2) @ (R * dnorm_sq)  # symmetric
        dM = q3.transpose(1, 2) @ dR
        dq.baddbmm_(dR, M).baddbmm_(qm, dG, alpha=2.0)  # R = q M; G = Σ_real q qᵀ
        dk = dk.baddbmm(km, dM + dM.transpose(1, 2))  # M = Σ_real k kᵀ
        B, h = dy.shape[0], ctx.num_heads
        dqkv = torch.empty(B, S, 3, h, d, dtype=dy.dtype, device=dy.device)
        for i, grad in enumerate((dq, dk, dv)):
            dqkv[:, :, i].copy_(grad.view(B, h, S, d).transpose(1, 2))
        return dqkv.view(B, S, 3 * h * d), dw, None, None


def _core_backward_whole(dy3, q3, k3, v3, cR, probs):
    """Gradients of softmax(q kᵀ + cR qᵀ) v w.r.t. q, k, v and cR, all heads and rows at once."""
    dscores = torch._softmax_backward_data(dy3 @ v3.transpose(1, 2), probs, -1, probs.dtype)  # (BH, S, S)
    dv = probs.transpose(1, 2) @ dy3
    dk = dscores.transpose(1, 2) @ q3
    dq = torch.baddbmm(dscores @ k3, dscores.transpose(1, 2), cR)  # q as query and as key
    dcR = dscores @ q3
    return dq, dk, dv, dcR


def _core_backward_blocked(dy3, q3, k3, v3, q_aug, probs, blocks):
    """The same in blocks of (heads, query rows), one workspace reused; q_aug = [q, cR]."""
    BH, S, d = q3.shape
    vT = v3.transpose(1, 2).contiguous()
    k_aug = torch.cat([k3, q3], dim=-1)  # (BH, S, 2d)
    # sums over query rows accumulate transposed, (BH, ., S), so each GEMM reads its block as it lies
    dvT = torch.empty(BH, d, S, dtype=dy3.dtype, device=dy3.device)
    dkT_aug = torch.empty(BH, 2 * d, S, dtype=dy3.dtype, device=dy3.device)  # [dk, dq as key]ᵀ
    dq_aug = torch.empty_like(q_aug)  # [dq, d(c ⊙ R)]
    work = torch.empty(_block_numel(blocks, S), dtype=dy3.dtype, device=dy3.device)
    for g, r in blocks:
        p = probs[g, r]
        dscores = torch.bmm(dy3[g, r], vT[g], out=_view(work, p.shape))  # d probs
        torch.ops.aten._softmax_backward_data.out(dscores, p, -1, p.dtype, grad_input=dscores)  # in place
        if r.start == 0:  # first block of these heads: write, later blocks accumulate
            torch.bmm(dy3[g, r].transpose(1, 2), p, out=dvT[g])
            torch.bmm(q_aug[g, r].transpose(1, 2), dscores, out=dkT_aug[g])
        else:
            dvT[g].baddbmm_(dy3[g, r].transpose(1, 2), p)
            dkT_aug[g].baddbmm_(q_aug[g, r].transpose(1, 2), dscores)
        torch.bmm(dscores, k_aug[g], out=dq_aug[g, r])
    del work
    dq = dq_aug[..., :d] + dkT_aug[:, d:].transpose(1, 2)
    return dq, dkT_aug[:, :d].transpose(1, 2), dvT.transpose(1, 2), dq_aug[..., d:]


def _block_numel(blocks, S: int) -> int:
    g, r = blocks[0]
    return (g.stop - g.start) * (r.stop - r.start) * S


def _view(buffer: torch.Tensor, shape) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    return buffer[:n].view(*shape)


# CPU dispatch, measured with bench/attention.py: the hand-fused depth-1 path while the kept softmax
# probabilities (B·h·S² floats) stay under CPU_FUSED_MAX_SCORES; otherwise `fractal_augment` +
# `softmax_attention`, which materialises the scores up to MATERIALIZED_SCORES_MAX_LEN and uses the
# fused SDPA kernel beyond.
CPU_FUSED_MAX_SCORES = 1 << 26
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
        self.ln = nn.LayerNorm(H)
        if self.use_spectral:
            self.sq, self.sk, self.sv = (nn.Linear(H, ds) for _ in range(3))
            self.st = nn.Linear(ds, H, bias=False)
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
        projected = F.linear(x, *self._input_projection())  # (B, S, 3H [+ 3ds])
        return self.ln(x + self._output(self._attend(projected, key_mask)))

    def forward_tokens(self, x: torch.Tensor, layout: "TokenLayout") -> torch.Tensor:
        """The same block on the real tokens only: x (T, H) are the rows `layout.index` of a padded (B, S)
        batch. The per-token GEMMs run on T rows instead of B·S; only the attention core sees the padded
        layout (padded rows zero, masked as keys, dropped as queries)."""
        projected = layout.pad(F.linear(x, *self._input_projection()))  # (B, S, 3H [+ 3ds])
        return self.ln(x + self._output(layout.unpad(self._attend(projected, layout.mask))))

    def _attend(self, projected: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, S, 3H [+ 3ds]) projections -> (B, S, H [+ ds]): merged heads [y, sy] before the output GEMM."""
        B, S, _ = projected.shape
        H = self.q.in_features
        widths = [3 * H] + ([self.sq.out_features] * 3 if self.use_spectral else [])
        qkv, *spectral_qkv = projected.split(widths, dim=-1)  # one split: its backward is one cat
        if not self.use_spectral:
            y = softmax_attention(*self._heads(qkv), key_mask)  # (B, h, S, d)
            return self.dropout(y.transpose(1, 2).reshape(B, S, H))
        if (self.fractal_weights.shape[0] == 1 and projected.device.type == "cpu"
                and projected.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled("cpu")
                and B * self.num_heads * S * S <= CPU_FUSED_MAX_SCORES):
            y = _FractalSoftmaxAttention.apply(qkv, self.fractal_weights[0], key_mask, self.num_heads)  # (B, h, S, d)
        else:
            q, k, v = self._heads(qkv)
            q, k = fractal_augment(q, k, key_mask, self.fractal_weights)  # (B, h, S, 2^t d)
            y = softmax_attention(q, k, v, key_mask)  # (B, h, S, d)
        sy = spectral_attention(*spectral_qkv, key_mask, self.spectral_chunk_size)  # (B, S, ds)
        return torch.cat([self.dropout(y.transpose(1, 2).reshape(B, S, H)), sy], dim=-1)  # (B, S, H + ds)

    def _output(self, merged: torch.Tensor) -> torch.Tensor:
        """o(y) + clamp(f, 0, 0.5) · st(sy) as one GEMM over [y, sy]."""
        if not self.use_spectral:
            return self.o(merged)
        fusion = self.spectral_fusion_weight.clamp(0.0, 0.5)
        return F.linear(merged, torch.cat([self.o.weight, fusion * self.st.weight], dim=1), self.o.bias)


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
