"""Literal, slow implementations of SPEC formulas: the references the fast paths are tested against.

These follow SPEC section 3 word for word, including the O(S³) product P = A_v A_vᵀ, and are used only by
the tests and by bench/attention.py.
"""
import math

import torch


def literal_attention(att, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SPEC 3 for a `SpectralEntropyAttention` module's weights: x (B, S, H), mask (B, S) 1 = real."""
    B, S, H = x.shape
    h, d = att.num_heads, att.head_dim
    real = mask.bool()
    m = real.to(x.dtype)

    def heads(t):
        return t.view(B, S, h, d).transpose(1, 2)  # (B, h, S, d)

    q, k, v = heads(att.q(x)), heads(att.k(x)), heads(att.v(x))
    A = q @ k.transpose(-1, -2) / math.sqrt(d)  # (B, h, S, S)
    if att.use_spectral:
        for w in att.fractal_weights:
            A_v = A * m[:, None, None, :]  # keep the columns of real keys
            P = A_v @ A_v.transpose(-1, -2)  # P[i, j] = Σ_k m_k A_ik A_jk: the O(S³) product
            norm = ((P ** 2) * m[:, None, None, :]).sum(-1, keepdim=True).sqrt()  # over real j only
            A = A + w * P / norm.clamp_min(1e-12)
    A = A.masked_fill(~real[:, None, None, :], float("-inf"))
    y = (A.softmax(-1) @ v).transpose(1, 2).reshape(B, S, H)
    out = x + att.o(att.dropout(y))
    if att.use_spectral:
        qs, ks, vs = att.sq(x), att.sk(x), att.sv(x)
        sp = torch.sigmoid(qs @ ks.transpose(1, 2) / math.sqrt(qs.shape[-1])) ** 2  # (B, S, S)
        sp = sp * m[:, None, :]  # masked keys' columns set to 0
        out = out + att.spectral_fusion_weight.clamp(0, 0.5) * att.st(sp @ vs)
    return att.ln(out)
