"""The hand-fused CPU kernel of Spectral-Entropy Attention: fractal depth 1, float32/float64.

`FusedSpectralEntropyAttention` computes exactly what `attention.py`'s generic path computes (the input
projection, `fractal_augment`, `softmax_attention` and `spectral_attention`), for the case that dominates
CPU training: hidden states in, merged heads [dropout(y), sy] out, with a written-out backward. Why a
kernel of its own: on a CPU the generic path spends as much on allocation, copies and the augmented
(2d-wide) score GEMM as on arithmetic, about 2x a plain attention block, where this one costs about 1.5x
(bench/attention.py). Its pieces:

- the fractal norms read off F = R qᵀ (the fractal half of the scores), not from Gram matrices;
- heads in groups whose (S, S) scores stay in cache (`BLOCK_FLOATS`);
- F and the probabilities kept for the backward pass (so `attention.CPU_FUSED_MAX_SCORES` bounds its use);
- scratch (projections, scores, heads, the spectral map) in per-thread workspaces (`_workspace`), because
  a fresh allocation of a few MiB is returned to the OS and page-faulted in again on every call.

tests/test_attention.py checks it against the literal O(S³) formula, in values and gradients (gradcheck
in float64), with dropout, and with every workspace allocated fresh.

Not handled here: fractal depth > 1, autocast, GPUs (the generic path runs those).
"""
from __future__ import annotations

import threading

import torch


def _head_blocks(BH: int, S: int, budget: int) -> list[slice]:
    """Groups of heads whose (S, S) scores hold about `budget` floats (at least one head each)."""
    heads = max(1, min(BH, budget // (S * S)))
    return [slice(g, min(g + heads, BH)) for g in range(0, BH, heads)]


class FusedSpectralEntropyAttention(torch.autograd.Function):
    """The attention sub-block up to its output GEMM, for fractal_depth 1 on a CPU (fp32/fp64), fused by
    hand: hidden states in, merged heads [dropout(y), sy] out.

    The same function as the generic path (`F.linear`, `fractal_augment`, `softmax_attention`,
    `spectral_attention`), computed in the form that is cheapest where (S, S) tensors sit in cache. Per
    head, with q, k zeroed at padded rows (so every Gram sum runs over real tokens only):

        M = kᵀk,  R = q M,  F = R qᵀ          F is P on real keys: P[i, j] = q_i M q_j (and zero at padded j)
        n_i = ‖F_i‖₂,  c_i = w / max(n_i, 1e-12)
        scores = q kᵀ + c ⊙ F,  masked keys -inf,  y = softmax(scores) v

    F costs the S²·d of the second half of the augmented-score GEMM, and reading its rows for n is
    cheaper than the Gram route (G = qᵀq, R G). Backward, with dc_i = Σ_j dscores_ij F_ij:
    dF = c ⊙ dscores - (w dc / n³) ⊙ F; F = q M qᵀ uses q twice, so q gets (dF + dFᵀ) q M and k gets
    k qᵀ (dF + dFᵀ) q; for short S, dF + dFᵀ is formed in cache and the product is one GEMM, not two.

    Why it owns the input projection: its (B·S, 3H + 3ds) output and gradient are scratch here, kept in
    a per-thread workspace (`_workspace`). Returned or freshly allocated each call, these few MiB are
    given back to the OS by malloc and page-faulted in again, which on a CPU costs as much as the softmax.
    With `token_index` (the real-token rows of a padded (B, S) batch, see TokenLayout) x holds real
    tokens only and the projection GEMMs run on those rows.

    Heads run in groups of about BLOCK_FLOATS scores, which stay in cache; F and the probabilities are
    kept for the backward pass (no recomputation), which is why this path is bounded by
    CPU_FUSED_MAX_SCORES. Padded query rows are unspecified (they attend with q = 0).
    x: (B, S, H), or (T, H) with token_index (T,); weight, bias: the stacked projection (q rows carrying
    the softmax scale); w: 0-dim fractal weight; key_mask: (B, S) bool or None; dropout_p: applied to y
    (0 outside training). Returns (B, S, H + ds).
    """

    BLOCK_FLOATS = 1 << 20  # 4 MiB of fp32 scores per group of heads
    SYMMETRIZE_MAX_LEN = 256  # (dF + dFᵀ) q as one GEMM up to this S (bench/attention.py)

    @staticmethod
    def forward(ctx, x, weight, bias, w, key_mask, token_index, num_heads, spectral_dim, dropout_p):
        B, S = key_mask.shape if key_mask is not None else x.shape[:2]
        width, ds, h = weight.shape[0], spectral_dim, num_heads
        H = (width - 3 * ds) // 3
        d, BH = H // h, B * h
        dtype, device = x.dtype, x.device
        projected = _workspace("projection", B * S * width, dtype, device).view(B * S, width)
        if token_index is None:
            torch.addmm(bias, x.reshape(B * S, -1), weight.t(), out=projected)
        else:  # padded rows zero: finite, and q, k, vs must vanish there
            tokens = _workspace("tokens", token_index.numel() * width, dtype, device).view(-1, width)
            projected.zero_().index_copy_(0, token_index, torch.addmm(bias, x, weight.t(), out=tokens))
        projected = projected.view(B, S, width)
        # copies out of the workspace: q, k, v head-major (BH, S, d), and the spectral qs (scaled), ks, vs
        qkv = torch.empty(3, B, h, S, d, dtype=dtype, device=device)
        qkv.copy_(projected[..., :3 * H].unflatten(-1, (3, h, d)).permute(2, 0, 3, 1, 4))
        q, k, v = qkv.view(3, BH, S, d).unbind(0)
        spectral = torch.empty(3, B, S, ds, dtype=dtype, device=device)
        spectral.copy_(projected[..., 3 * H:].unflatten(-1, (3, ds)).permute(2, 0, 1, 3))
        qs, ks, vs = spectral.unbind(0)
        qs.mul_(ds ** -0.5)
        real = bias_inf = None
        if key_mask is not None:
            real = key_mask.repeat_interleave(h, dim=0)  # (BH, S)
            bias_inf = torch.zeros(BH, 1, S, dtype=dtype, device=device).masked_fill_(~real[:, None, :], float("-inf"))
            q.mul_(real[:, :, None])
            k.mul_(real[:, :, None])
            vs.mul_(key_mask[:, :, None])  # masked keys contribute nothing to the spectral path
        M = torch.bmm(k.transpose(1, 2), k)  # (BH, d, d) = Σ_real k kᵀ
        R = torch.bmm(q, M)  # (BH, S, d)
        blocks = _head_blocks(BH, S, FusedSpectralEntropyAttention.BLOCK_FLOATS)
        keep = any(ctx.needs_input_grad)
        # F and the probabilities, one tensor per group of heads when kept for the backward pass
        fracs, probs = [], []
        norm = torch.empty(BH, S, 1, dtype=dtype, device=device)
        y = _workspace("heads", BH * S * d, dtype, device).view(BH, S, d)  # copied into `merged` below
        if not keep:
            work = _workspace("scores", 2 * _block_numel(blocks, S), dtype, device).view(2, -1)
        for g in blocks:
            shape = (g.stop - g.start, S, S)
            f_numel = shape[0] * S * S
            f = torch.empty(shape, dtype=dtype, device=device) if keep else work[0, :f_numel].view(shape)
            p = torch.empty(shape, dtype=dtype, device=device) if keep else work[1, :f_numel].view(shape)
            fracs.append(f)
            probs.append(p)
            torch.bmm(R[g], q[g].transpose(1, 2), out=f)  # (heads, S, S): F
            n = torch.linalg.vector_norm(f, dim=-1, keepdim=True, out=norm[g])  # (heads, S, 1)
            c = w / n.clamp_min(1e-12)
            if real is None:
                torch.mul(f, c, out=p)
            else:  # masked keys -inf
                torch.addcmul(bias_inf[g], f, c, out=p)
            p.baddbmm_(q[g], k[g].transpose(1, 2))  # scores
            torch.ops.aten._softmax.out(p, -1, False, out=p)  # in place (the kernel reads a row before writing it)
            torch.bmm(p, v[g], out=y[g])
        gate = torch.sigmoid_(torch.bmm(qs, ks.transpose(1, 2)))  # (B, S, S) spectral map
        merged = torch.empty(B, S, H + ds, dtype=dtype, device=device)
        merged[..., :H].view(B, S, h, d).copy_(y.view(B, h, S, d).transpose(1, 2))
        gate_sq = torch.mul(gate, gate, out=_workspace("spectral", gate.numel(), dtype, device).view(gate.shape))
        merged[..., H:] = torch.bmm(gate_sq, vs)
        keep_mask = None
        if dropout_p > 0:
            keep_mask = torch.empty(B, S, H, dtype=dtype, device=device).bernoulli_(1 - dropout_p).div_(1 - dropout_p)
            merged[..., :H].mul_(keep_mask)
        if keep:
            ctx.save_for_backward(x, weight, token_index, q, k, v, w, M, R, norm, qs, ks, vs, gate, keep_mask,
                                  key_mask, *fracs, *probs)
            ctx.blocks, ctx.num_heads, ctx.batch_seq = blocks, h, (B, S)
        return merged

    @staticmethod
    def backward(ctx, dmerged):
        x, weight, token_index, q, k, v, w, M, R, norm, qs, ks, vs, gate, keep_mask, key_mask, *kept = ctx.saved_tensors
        fracs, probs = kept[:len(ctx.blocks)], kept[len(ctx.blocks):]
        (B, S), h = ctx.batch_seq, ctx.num_heads
        BH, _, d = q.shape
        H, ds, width = h * d, qs.shape[-1], weight.shape[0]
        dtype, device = q.dtype, q.device
        # dy and the gradients of q, k, v and (dF + dFᵀ) q, all scratch: copied into dprojected below
        dy, dq, dk, dv, dF_q = _workspace("heads", 5 * BH * S * d, dtype, device).view(5, BH, S, d).unbind(0)
        dy = dy.view(B, h, S, d)
        dy_heads = dmerged[..., :H].view(B, S, h, d).transpose(1, 2)  # (B, h, S, d) view
        if keep_mask is None:
            dy.copy_(dy_heads)
        else:
            torch.mul(dy_heads, keep_mask.view(B, S, h, d).transpose(1, 2), out=dy)
        dy = dy.view(BH, S, d)
        inv_norm = norm.clamp_min(1e-12).reciprocal_()  # (BH, S, 1)
        c = w * inv_norm
        # dn / n where n > 1e-12 (else the clamp holds c fixed): dn = -w dc / n², so dF gets -w dc / n³ ⊙ F
        coef_scale = (-w / norm.pow(3)).masked_fill_(norm <= 1e-12, 0.0)
        dc = torch.empty(BH, S, 1, dtype=dtype, device=device)
        work = _workspace("scores", 2 * _block_numel(ctx.blocks, S), dtype, device).view(2, -1)
        for g, p, f in zip(ctx.blocks, probs, fracs):
            dscores = torch.bmm(dy[g], v[g].transpose(1, 2), out=work[0, :p.numel()].view(p.shape))  # d probs
            torch.ops.aten._softmax_backward_data.out(dscores, p, -1, p.dtype, grad_input=dscores)  # in place
            torch.bmm(p.transpose(1, 2), dy[g], out=dv[g])
            torch.bmm(dscores.transpose(1, 2), q[g], out=dk[g])  # k as key
            torch.bmm(dscores, k[g], out=dq[g])  # q as query
            dF = work[1, :p.numel()].view(p.shape)  # first the product for dc, then dF itself
            torch.sum(torch.mul(dscores, f, out=dF), dim=-1, keepdim=True, out=dc[g])
            torch.mul(dscores, c[g], out=dF).addcmul_(f, dc[g] * coef_scale[g])
            if S <= FusedSpectralEntropyAttention.SYMMETRIZE_MAX_LEN:  # one GEMM on dF + dFᵀ
                torch.bmm(torch.add(dF, dF.transpose(1, 2), out=dscores), q[g], out=dF_q[g])  # dscores is spent
            else:  # the transposed read no longer stays in cache: two GEMMs
                torch.bmm(dF, q[g], out=dF_q[g]).baddbmm_(dF.transpose(1, 2), q[g])
        dw = (dc * inv_norm).sum().reshape(w.shape)
        dq.baddbmm_(dF_q, M)  # F = q M qᵀ: both roles of q
        dk.baddbmm_(k, torch.bmm(q.transpose(1, 2), dF_q))  # M = Σ k kᵀ, dM + dMᵀ = qᵀ (dF + dFᵀ) q
        if key_mask is not None:  # q, k were zeroed at padded rows, so are their gradients
            real = key_mask[:, None, :, None]  # (B, 1, S, 1) against (B, h, S, d)
            dq.view(B, h, S, d).mul_(real)
            dk.view(B, h, S, d).mul_(real)
        # the gradient of the projection, in its (B, S, 3, h, d) + (B, S, 3, ds) layout, in the workspace
        dprojected = _workspace("projection", B * S * width, dtype, device).view(B, S, width)
        for i, grad in enumerate((dq, dk, dv)):
            dprojected[..., i * H:(i + 1) * H].view(B, S, h, d).copy_(grad.view(B, h, S, d).transpose(1, 2))
        # spectral path: out = g² vs with g = sigmoid(s); d out/d s = 2 g · g (1 - g)
        dsy = dmerged[..., H:]
        spectral_work = _workspace("spectral", 2 * gate.numel(), dtype, device).view(2, *gate.shape)
        sp = torch.mul(gate, gate, out=spectral_work[0])
        dqs, dks, dvs = dprojected[..., 3 * H:].split(ds, dim=-1)
        dvs_real = torch.bmm(sp.transpose(1, 2), dsy)
        if key_mask is not None:
            dvs_real.mul_(key_mask[:, :, None])  # vs was masked
        dvs.copy_(dvs_real)
        dlogits = torch.bmm(dsy, vs.transpose(1, 2), out=spectral_work[1]).mul_(sp)
        dlogits.addcmul_(dlogits, gate, value=-1.0)  # ⊙ (1 - g); the factor 2 goes on the results below
        torch.mul(torch.bmm(dlogits, ks), 2.0 * ds ** -0.5, out=dqs)
        torch.mul(torch.bmm(dlogits.transpose(1, 2), qs), 2.0, out=dks)
        # the projection GEMM's backward
        dprojected = dprojected.view(B * S, width)
        if token_index is not None:
            tokens = _workspace("tokens", token_index.numel() * width, dtype, device).view(-1, width)
            dprojected = torch.index_select(dprojected, 0, token_index, out=tokens)
        x2 = x.reshape(dprojected.shape[0], -1)
        dx = (dprojected @ weight).view(x.shape) if ctx.needs_input_grad[0] else None
        dweight = dprojected.t() @ x2 if ctx.needs_input_grad[1] else None
        dbias = dprojected.sum(0) if ctx.needs_input_grad[2] else None
        return dx, dweight, dbias, dw, None, None, None, None, None


def _block_numel(blocks: list[slice], S: int) -> int:
    return max(g.stop - g.start for g in blocks) * S * S


_workspaces = threading.local()
WORKSPACE_MAX_BYTES = 64 << 20  # per buffer; 5 names per thread and dtype


def _workspace(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Scratch buffer `name` of `numel` elements, kept per thread, dtype and device between calls.

    For scratch of a few MiB per call (projections, blocks of scores): a fresh allocation that size is
    handed back to the OS by glibc's malloc when freed and page-faulted in again on the next call, which
    costs as much as the arithmetic on a CPU. Holds nothing across calls: never saved, never returned.
    Buffers over WORKSPACE_MAX_BYTES are allocated fresh, so that one large batch does not pin its
    scratch for the life of the process.
    """
    if numel * dtype.itemsize > WORKSPACE_MAX_BYTES:
        return torch.empty(numel, dtype=dtype, device=device)
    cache = getattr(_workspaces, "buffers", None)
    if cache is None:
        cache = _workspaces.buffers = {}
    key = (name, dtype, device)
    buffer = cache.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = cache[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel]
