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


def literal_model_forward(state_dict: dict, cfg, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    """SPEC 2-4 for a whole model, in eval mode, computed from a raw state dict with the original's key
    names (SPEC 7). Uses nothing from nsa_lib, and the literal O(S³) fractal formula.

    `cfg`: a dict (or anything with `to_dict()`) giving `num_heads`, `sem_dims`, `ent_dims` and optionally
    `pooling` ("mean" default, or "cls"). Everything else (depth, widths, which heads exist) comes from the
    tensors. input_ids, attention_mask: (B, S), right padding, 1 = real token. Returns NSAModel's keys.
    """
    import torch.nn.functional as F

    sd = state_dict
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    h = int(cfg["num_heads"])

    def linear(x, name):
        return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])  # every Linear of the original has a bias

    def layer_norm(x, name):
        return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-5)

    B, S = input_ids.shape
    real = attention_mask.bool()  # (B, S)
    dtype = sd["backbone.tok_emb.weight"].dtype
    m = real.to(dtype)
    H = sd["backbone.tok_emb.weight"].shape[1]
    d = H // h

    # SPEC 2: embeddings, positions 0..S-1 (right padding), no dropout in eval
    x = sd["backbone.tok_emb.weight"][input_ids] + sd["backbone.pos_emb.weight"][torch.arange(S)][None]
    num_layers = len({int(k.split(".")[2]) for k in sd if k.startswith("backbone.layers.")})
    for n in range(num_layers):
        p = f"backbone.layers.{n}.attn"

        def heads(t):
            return t.reshape(B, S, h, d).transpose(1, 2)  # (B, h, S, d)

        q, k, v = heads(linear(x, f"{p}.q")), heads(linear(x, f"{p}.k")), heads(linear(x, f"{p}.v"))
        A = q @ k.transpose(-1, -2) / math.sqrt(d)  # (B, h, S, S)
        spectral = f"{p}.sq.weight" in sd
        if spectral:
            for w in sd[f"{p}.fractal_weights"]:
                A_v = A * m[:, None, None, :]  # columns of real keys only
                P = A_v @ A_v.transpose(-1, -2)  # the O(S³) product, P[i, j] = Σ_k m_k A_ik A_jk
                norm = ((P ** 2) * m[:, None, None, :]).sum(-1, keepdim=True).sqrt()  # over real j
                A = A + w * P / norm.clamp_min(1e-12)
        A = A.masked_fill(~real[:, None, None, :], float("-inf"))
        y = (A.softmax(-1) @ v).transpose(1, 2).reshape(B, S, H)
        out = x + linear(y, f"{p}.o")
        if spectral:
            qs, ks, vs = linear(x, f"{p}.sq"), linear(x, f"{p}.sk"), linear(x, f"{p}.sv")
            sp = torch.sigmoid(qs @ ks.transpose(1, 2) / math.sqrt(qs.shape[-1])) ** 2  # (B, S, S)
            sp = sp * m[:, None, :]  # masked keys' columns set to 0
            out = out + sd[f"{p}.spectral_fusion_weight"].clamp(0.0, 0.5) * linear(sp @ vs, f"{p}.st")
        x = layer_norm(out, f"{p}.ln")
        f = f"backbone.layers.{n}.ffn"
        x = layer_norm(x + linear(F.silu(linear(x, f"{f}.w1")) * linear(x, f"{f}.w2"), f"{f}.w3"), f"{f}.ln")
    hidden = layer_norm(x, "backbone.ln")  # (B, S, H)

    token_mean = (hidden * m[..., None]).sum(1) / m.sum(1, keepdim=True)  # (B, H)
    pooled = hidden[:, 0] if cfg.get("pooling", "mean") == "cls" else token_mean

    def matryoshka(head, dims):
        z = F.normalize(layer_norm(linear(pooled, f"{head}.proj"), f"{head}.norm"), dim=-1)
        return {int(dim): F.normalize(z[:, :dim], dim=-1) for dim in dims}

    out = {
        "embedding_semantic": matryoshka("sem_head", cfg["sem_dims"]),
        "entity": matryoshka("ent_head", cfg["ent_dims"]),
        "retrieval128": F.normalize(linear(F.gelu(linear(pooled, "retr.0")), "retr.2"), dim=-1),
    }
    if "anchor.0.weight" in sd:
        out["anchor64"] = F.normalize(layer_norm(linear(pooled, "anchor.0"), "anchor.1"), dim=-1)
    r = "rank_head"
    anomalous = layer_norm(F.gelu(linear(layer_norm(F.gelu(linear(token_mean, f"{r}.to_anom.0")), f"{r}.to_anom.2"),
                                         f"{r}.to_anom.3")), f"{r}.to_anom.5")
    spectral_vec = layer_norm(linear(torch.tanh(linear(anomalous, f"{r}.to_spec.0")), f"{r}.to_spec.2"),
                              f"{r}.to_spec.3")
    score = 1.0 - torch.sigmoid((anomalous @ sd[f"{r}.anom_basis"].T).abs().max(-1).values)  # (B,)
    ranking = F.normalize(layer_norm(linear(torch.cat([anomalous * score[:, None], spectral_vec], -1), f"{r}.out.0"),
                                     f"{r}.out.1"), dim=-1)
    out.update(anomalous=anomalous, spectral=spectral_vec, anomaly_score=score, embedding_ranking=ranking,
               pooled=pooled, last_hidden_state=hidden)
    return out
