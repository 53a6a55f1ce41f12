"""SpectralEntropyAttention against the literal O(S³) formula of SPEC 3 (tests/reference.py).

The fast module folds the fractal term into an augmented (q, k) pair and runs either a materialised
softmax (short S on CPU) or fused SDPA with V zero-padded, and the spectral path may run in query chunks;
on a CPU, depth 1 runs the hand-fused `cpu_attention.FusedSpectralEntropyAttention` instead.
Every one of those paths is checked here against `literal_attention`, in values and in gradients, and for
the property the original lacked: a real token's output does not depend on padding or batch-mates.
"""
import math

import pytest
import torch

import nsa_lib.attention as attention_module
import nsa_lib.cpu_attention as cpu_attention
from nsa_lib import NSAConfig, SpectralEntropyAttention
from nsa_lib.attention import fractal_augment
from tests.reference import literal_attention

# helpers

LENGTHS = (7, 4, 1)  # real tokens per row: right padding of different amounts, one single-token row


def make_attention(*, dtype=torch.float64, seed=0, fractal_init=0.5, **overrides) -> SpectralEntropyAttention:
    """A tiny attention block in eval mode, with LayerNorm and fusion weights moved off their defaults
    so that every parameter influences the output."""
    cfg = NSAConfig.from_preset("tiny", **{"hidden_size": 16, "num_heads": 2, "spectral_dim": 8, "dropout": 0.0,
                                           "fractal_init": fractal_init, **overrides})
    torch.manual_seed(seed)
    att = SpectralEntropyAttention(cfg).to(dtype).eval()
    with torch.no_grad():
        att.ln.weight.uniform_(0.5, 1.5)
        att.ln.bias.normal_(0.0, 0.1)
        if cfg.use_spectral:
            att.spectral_fusion_weight.fill_(0.3)  # inside clamp(0, 0.5): its gradient is not clipped to 0
    return att


def make_inputs(lengths, *, hidden=16, dtype=torch.float64, seed=1, seq_len=None):
    """x (B, S, H) with random values everywhere (padding included) and a right-padded 0/1 mask."""
    S = seq_len or max(lengths)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), S, hidden, generator=g, dtype=dtype)
    mask = torch.zeros(len(lengths), S, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    return x, mask


def real_max_diff(a, b, mask) -> float:
    """Largest |a - b| over real-token positions only."""
    real = mask.bool()
    return (a[real].double() - b[real].double()).abs().max().item()


@pytest.fixture(params=["cpu-fused", "cpu-fused-blocked", "materialized", "sdpa"])
def softmax_path(request, monkeypatch):
    """Every attention path: the hand-fused CPU function for depth 1 (one group of heads, or one head at a
    time with every scratch buffer allocated fresh), and the generic `fractal_augment` +
    `softmax_attention` with materialised (S, S) scores or with the fused SDPA kernel and V zero-padded
    (the GPU path)."""
    if request.param == "cpu-fused-blocked":
        monkeypatch.setattr(cpu_attention.FusedSpectralEntropyAttention, "BLOCK_FLOATS", 16)
        monkeypatch.setattr(cpu_attention, "WORKSPACE_MAX_BYTES", 0)
    if request.param in ("materialized", "sdpa"):
        monkeypatch.setattr(attention_module, "CPU_FUSED_MAX_SCORES", 0)
    if request.param == "sdpa":
        monkeypatch.setattr(attention_module, "MATERIALIZED_SCORES_MAX_LEN", 0)
    else:
        assert max(LENGTHS) <= attention_module.MATERIALIZED_SCORES_MAX_LEN
    return request.param


# the module against the literal formula


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_matches_literal_formula(softmax_path, depth, dtype, tol):
    att = make_attention(fractal_depth=depth, dtype=dtype)
    x, mask = make_inputs(LENGTHS, dtype=dtype)
    with torch.no_grad():
        fast, literal = att(x, mask), literal_attention(att, x, mask)
    assert fast.shape == x.shape and fast.dtype == dtype
    assert real_max_diff(fast, literal, mask) <= tol


@pytest.mark.parametrize("depth", [1, 2])
def test_fractal_term_is_not_negligible(softmax_path, depth):
    """Guards the comparison above against vacuity: the fractal term must move the output."""
    att = make_attention(fractal_depth=depth)
    x, mask = make_inputs(LENGTHS)
    with torch.no_grad():
        with_fractal = att(x, mask)
        att.fractal_weights.zero_()
        without = att(x, mask)
        assert real_max_diff(without, literal_attention(att, x, mask), mask) <= 1e-10
    assert real_max_diff(with_fractal, without, mask) > 1e-2


def test_chunked_spectral_path_matches_literal(softmax_path):
    att = make_attention(fractal_depth=2)
    att.spectral_chunk_size = 4  # S = 11: chunks of 4, 4, 3
    x, mask = make_inputs((11, 6, 9))
    x.requires_grad_(True)  # the chunks take their recompute-in-backward branch
    fast = att(x, mask)
    with torch.no_grad():
        literal = literal_attention(att, x, mask)
    assert real_max_diff(fast.detach(), literal, mask) <= 1e-10


def test_chunked_spectral_gradients_match_unchunked():
    att = make_attention(fractal_depth=2)
    x, mask = make_inputs((11, 6, 9))
    weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=x.dtype) * mask[..., None]

    def grads(chunk_size):
        att.spectral_chunk_size = chunk_size
        att.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        (att(xi, mask) * weight).sum().backward()
        return xi.grad, {n: p.grad.clone() for n, p in att.named_parameters()}

    x_chunked, p_chunked = grads(4)
    x_full, p_full = grads(10_000)
    assert (x_chunked - x_full).abs().max().item() <= 1e-10
    assert x_full.abs().max().item() > 0
    assert set(p_chunked) == set(p_full)
    for name in p_full:
        assert (p_chunked[name] - p_full[name]).abs().max().item() <= 1e-10, name


# gradients


def test_gradcheck_wrt_hidden_states():
    att = make_attention(hidden_size=8, num_heads=2, spectral_dim=4, fractal_depth=2)
    x, mask = make_inputs((5, 3), hidden=8)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: att(t, mask), (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("depth", [1, 2])
def test_parameter_gradients_match_literal(softmax_path, depth):
    att = make_attention(fractal_depth=depth)
    x, mask = make_inputs(LENGTHS)
    # loss on real tokens only: padded outputs are not part of the spec
    weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype) * mask[..., None]

    def grads(fn):
        att.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        (fn(xi) * weight).sum().backward()
        return {"hidden_states": xi.grad, **{n: p.grad.clone() for n, p in att.named_parameters()}}

    fast = grads(lambda t: att(t, mask))
    literal = grads(lambda t: literal_attention(att, t, mask))
    assert set(fast) == set(literal)
    assert "fractal_weights" in fast and "spectral_fusion_weight" in fast
    for name in literal:
        assert (fast[name] - literal[name]).abs().max().item() <= 1e-8, name


def test_gradients_reach_fractal_and_fusion_weights():
    att = make_attention(fractal_depth=2, dtype=torch.float32)
    x, mask = make_inputs(LENGTHS, dtype=torch.float32)
    att(x, mask).pow(2).sum().backward()
    for name in ("fractal_weights", "spectral_fusion_weight"):
        grad = getattr(att, name).grad
        assert grad is not None, name
        assert torch.isfinite(grad).all() and (grad != 0).all(), (name, grad)


def test_non_learnable_toggles_freeze_parameters():
    att = make_attention(learnable_fractal=False, learnable_spectral_fusion=False)
    assert not att.fractal_weights.requires_grad
    assert not att.spectral_fusion_weight.requires_grad
    assert att.q.weight.requires_grad
    x, mask = make_inputs(LENGTHS)
    att(x, mask).sum().backward()
    assert att.fractal_weights.grad is None and att.spectral_fusion_weight.grad is None


# padding invariance (the original's bug)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
@pytest.mark.parametrize("depth", [1, 2])
def test_output_does_not_depend_on_padding_or_batch_mates(softmax_path, dtype, tol, depth):
    att = make_attention(fractal_depth=depth, dtype=dtype)
    lengths = (7, 3, 5)
    x, mask = make_inputs(lengths, dtype=dtype, seq_len=12)  # extra padding beyond the longest row
    with torch.no_grad():
        batched = att(x, mask)
        other_x, other_mask = make_inputs((2, 9), dtype=dtype, seed=7)  # different batch-mates and padding
        for row, n in enumerate(lengths):
            alone = att(x[row:row + 1, :n], torch.ones(1, n, dtype=torch.long))
            assert (alone[0] - batched[row, :n]).abs().max().item() <= tol
            # the same sentence with other batch-mates and a different amount of padding
            S = 9
            mixed_x = torch.cat([other_x, torch.zeros(1, S, x.shape[-1], dtype=dtype)])
            mixed_x[-1, :n] = x[row, :n]
            mixed_x[-1, n:] = 100.0  # large garbage in the padding must not leak in
            mixed_mask = torch.cat([other_mask, torch.zeros(1, S, dtype=torch.long)])
            mixed_mask[-1, :n] = 1
            mixed = att(mixed_x, mixed_mask)
            assert (mixed[-1, :n] - alone[0]).abs().max().item() <= tol


def test_mask_none_equals_all_ones(softmax_path):
    att = make_attention(fractal_depth=2)
    x, _ = make_inputs((6, 6))
    with torch.no_grad():
        no_mask = att(x, None)
        ones = att(x, torch.ones(2, 6, dtype=torch.long))
        bool_ones = att(x, torch.ones(2, 6, dtype=torch.bool))
    assert (no_mask - ones).abs().max().item() <= 1e-12
    assert (no_mask - bool_ones).abs().max().item() <= 1e-12
    assert (no_mask - literal_attention(att, x, torch.ones(2, 6))).abs().max().item() <= 1e-10


# the ablation: use_spectral=False is plain attention


def test_no_spectral_is_plain_multi_head_attention(softmax_path):
    att = make_attention(use_spectral=False)
    names = {name for name, _ in att.named_parameters()}
    for forbidden in ("sq", "sk", "sv", "st", "fractal_weights", "spectral_fusion_weight"):
        assert not any(n == forbidden or n.startswith(forbidden + ".") for n in names), forbidden
    assert names == {f"{m}.{p}" for m in ("q", "k", "v", "o", "ln") for p in ("weight", "bias")}

    x, mask = make_inputs(LENGTHS)
    B, S, H = x.shape
    h, d = att.num_heads, att.head_dim
    with torch.no_grad():
        def heads(t):
            return t.view(B, S, h, d).transpose(1, 2)

        q, k, v = heads(att.q(x)), heads(att.k(x)), heads(att.v(x))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, S, H)
        expected = torch.nn.functional.layer_norm(x + att.o(y), (H,), att.ln.weight, att.ln.bias, att.ln.eps)
        out = att(x, mask)
    assert real_max_diff(out, expected, mask) <= 1e-10


# fractal_augment alone


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_fractal_augment_equals_literal_enriched_scores(depth, masked):
    g = torch.Generator().manual_seed(11)
    B, h, S, D = 2, 3, 6, 4
    q = torch.randn(B, h, S, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, h, S, D, generator=g, dtype=torch.float64)
    weights = torch.tensor([0.7, -0.4, 0.3][:depth], dtype=torch.float64)
    key_mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3]).bool() if masked else None

    m = torch.ones(B, S, dtype=torch.float64) if key_mask is None else key_mask.double()
    A = q @ k.transpose(-1, -2)  # the scale is already in q
    for w in weights:
        A_v = A * m[:, None, None, :]
        P = A_v @ A_v.transpose(-1, -2)
        norm = ((P ** 2) * m[:, None, None, :]).sum(-1, keepdim=True).sqrt()
        A = A + w * P / norm.clamp_min(1e-12)

    q2, k2 = fractal_augment(q, k, key_mask, weights)
    assert q2.shape == k2.shape == (B, h, S, 2 ** depth * D)
    assert q2.dtype == torch.float64
    real = m.bool()[:, None, :, None] & m.bool()[:, None, None, :]  # (B, 1, S, S): real query and key
    assert ((q2 @ k2.transpose(-1, -2) - A).abs() * real).max().item() <= 1e-12
    assert (A - q @ k.transpose(-1, -2)).abs().max().item() > 1e-2  # the enrichment did something


# bad input


def test_rejects_bad_shapes():
    att = make_attention(dtype=torch.float32)
    x, mask = make_inputs((4, 2), dtype=torch.float32)
    with pytest.raises(ValueError, match=r"hidden_states must be \(batch, seq, 16\)"):
        att(torch.randn(2, 4, 12), mask)
    with pytest.raises(ValueError, match=r"hidden_states must be .*got \(4, 16\)"):
        att(x[0], mask[0])
    with pytest.raises(ValueError, match=r"attention_mask must be \(batch, seq\)"):
        att(x, mask[:, :3])
    with pytest.raises(ValueError, match=r"attention_mask must be"):
        att(x, mask[0])


# mixed precision and long sequences


def _cpu_bf16_autocast_works() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    except (RuntimeError, AssertionError):
        return False


@pytest.mark.skipif(not _cpu_bf16_autocast_works(), reason="CPU autocast to bfloat16 is not supported here")
def test_bf16_autocast_is_finite_and_close_to_fp32(softmax_path):
    att = make_attention(fractal_depth=2, dtype=torch.float32)
    x, mask = make_inputs(LENGTHS, dtype=torch.float32)
    with torch.no_grad():
        reference = att(x, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = att(x, mask)
    assert torch.isfinite(mixed).all()
    assert real_max_diff(mixed.float(), reference, mask) <= 5e-2


def test_long_sequence_chunked_matches_unchunked(monkeypatch):
    """S = 1100 on the generic path (the one a GPU takes; the fused CPU kernel has no query chunks): the
    spectral path in chunks of 512, 512 and 76 queries, recomputed in the backward pass, equals the same
    path in one piece, in values and gradients; and both equal the fused CPU kernel, a third computation."""
    att = make_attention(dtype=torch.float32, hidden_size=16, num_heads=2, spectral_dim=8)
    S = 1100
    x, mask = make_inputs((S,), dtype=torch.float32, seq_len=S)
    mask[0, 1000:] = 0  # some padding, beyond a chunk boundary
    weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)) * mask[..., None]

    def run():
        xi = x.clone().requires_grad_(True)
        out = att(xi, mask)
        (out * weight).sum().backward()
        return out.detach(), xi.grad

    fused, fused_grad = run()
    monkeypatch.setattr(attention_module, "CPU_FUSED_MAX_SCORES", 0)  # the generic path from here on
    chunk_lengths = []  # query rows per call of the spectral core (a spy: it delegates unchanged)
    core = attention_module._sigmoid_sq_attention
    monkeypatch.setattr(attention_module, "_sigmoid_sq_attention",
                        lambda qs, ks, vs: chunk_lengths.append(qs.shape[1]) or core(qs, ks, vs))
    att.spectral_chunk_size = 512
    chunked, chunked_grad = run()
    assert chunk_lengths[:3] == [512, 512, 76]  # then the same three again, recomputed in the backward pass
    chunk_lengths.clear()
    att.spectral_chunk_size = 1_000_000
    whole, whole_grad = run()
    assert chunk_lengths == [S]
    assert torch.isfinite(chunked).all()
    assert real_max_diff(chunked, whole, mask) <= 1e-5
    assert (chunked_grad - whole_grad).abs().max().item() <= 1e-5
    assert real_max_diff(chunked, fused, mask) <= 1e-4
    assert (chunked_grad - fused_grad).abs().max().item() <= 1e-4


def test_fractal_step_backward_passes_gradcheck():
    """The hand-written backward of one fractal step (the generic path) against finite differences."""
    from nsa_lib.attention import _FractalStep

    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 2, 6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_FractalStep.apply, (q, k, w))


@pytest.mark.parametrize("block_floats, symmetrize_max_len", [(1 << 20, 256), (8, 256), (1 << 20, 0)])
@pytest.mark.parametrize("inputs", ["whole", "masked", "tokens"])
def test_fused_cpu_attention_passes_gradcheck(inputs, block_floats, symmetrize_max_len, monkeypatch):
    """The hand-written forward/backward of the fused CPU path (depth 1: projection, fractal softmax
    attention, spectral path) against finite differences; in one group of heads and one head at a time;
    with dF + dFᵀ formed or as two GEMMs; on a padded batch and on its real tokens only."""
    from nsa_lib.attention import TokenLayout
    from nsa_lib.cpu_attention import FusedSpectralEntropyAttention

    monkeypatch.setattr(FusedSpectralEntropyAttention, "BLOCK_FLOATS", block_floats)  # 8: one head per group
    monkeypatch.setattr(FusedSpectralEntropyAttention, "SYMMETRIZE_MAX_LEN", symmetrize_max_len)  # 0: two GEMMs
    g = torch.Generator().manual_seed(6)
    heads, d, ds, hidden = 2, 3, 2, 4
    width = 3 * heads * d + 3 * ds
    mask = None if inputs == "whole" else torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]).bool()
    layout = TokenLayout(mask) if inputs == "tokens" else None
    x = torch.randn(2, 5, hidden, generator=g, dtype=torch.float64)
    x = (layout.unpad(x) if layout else x).requires_grad_(True)  # (T, hidden) real tokens, or (B, S, hidden)
    weight = torch.randn(width, hidden, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(width, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    real_rows = torch.ones(2, 5, 1, dtype=torch.float64) if mask is None else mask[:, :, None].double()

    def f(x, weight, bias, w):  # padded query rows are unspecified: compare real rows only
        out = FusedSpectralEntropyAttention.apply(x, weight, bias, w, mask, layout and layout.index, heads, ds, 0.0)
        return out * real_rows

    assert torch.autograd.gradcheck(f, (x, weight, bias, w))


@pytest.mark.parametrize("use_spectral", [True, False])
def test_forward_tokens_equals_forward_on_real_tokens(softmax_path, use_spectral):
    """The unpadded path the encoder takes (per-token GEMMs on real tokens only) against the padded one."""
    from nsa_lib.attention import TokenLayout

    cfg = NSAConfig.from_preset("tiny", dropout=0.0, fractal_init=0.5, use_spectral=use_spectral)
    att = SpectralEntropyAttention(cfg).double().eval()
    x, mask = make_inputs(LENGTHS, hidden=cfg.hidden_size, dtype=torch.float64)
    x = x.clone().requires_grad_(True)
    layout = TokenLayout(mask)
    tokens = layout.unpad(x).detach().requires_grad_(True)
    padded_out = att(x, mask)
    token_out = att.forward_tokens(tokens, layout)
    assert token_out.shape == (int(mask.sum()), cfg.hidden_size)
    assert (layout.unpad(padded_out) - token_out).abs().max() <= 1e-12
    (layout.unpad(padded_out) ** 2).sum().backward()
    (token_out ** 2).sum().backward()
    assert (layout.unpad(x.grad) - tokens.grad).abs().max() <= 1e-10
    assert torch.equal(layout.pad(tokens)[mask.bool()], tokens)


@pytest.mark.parametrize("tokens", [False, True])
def test_fused_dropout_equals_module_dropout(tokens, monkeypatch):
    """In training mode the fused CPU path applies dropout to y itself; with the same seed it must draw the
    same mask as the generic path's nn.Dropout and give the same outputs and gradients."""
    from nsa_lib.attention import TokenLayout

    att = make_attention(dropout=0.3).train()
    x, mask = make_inputs(LENGTHS)
    layout = TokenLayout(mask)
    fused_bound = attention_module.CPU_FUSED_MAX_SCORES

    def run(fused):
        monkeypatch.setattr(attention_module, "CPU_FUSED_MAX_SCORES", fused_bound if fused else 0)
        att.zero_grad(set_to_none=True)
        xi = (layout.unpad(x) if tokens else x).clone().requires_grad_(True)
        torch.manual_seed(11)
        out = att.forward_tokens(xi, layout) if tokens else att(xi, mask)
        out = out if tokens else layout.unpad(out)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        return out.detach(), xi.grad, {n: p.grad for n, p in att.named_parameters()}

    fused, generic = run(True), run(False)
    without_dropout = att.eval()(x, mask)
    assert real_max_diff(layout.pad(fused[0]), without_dropout.detach(), mask) > 1e-2  # dropout did act
    assert (fused[0] - generic[0]).abs().max() <= 1e-12
    real = layout.unpad(torch.ones_like(x)).bool() if tokens else mask.bool()
    assert (fused[1] - generic[1])[real].abs().max() <= 1e-10
    for name, grad in generic[2].items():
        assert (fused[2][name] - grad).abs().max() <= 1e-10, name


def test_workspace_is_reused_below_its_cap_and_fresh_above(monkeypatch):
    from nsa_lib.cpu_attention import _workspace

    first = _workspace("test", 100, torch.float32, torch.device("cpu"))
    again = _workspace("test", 50, torch.float32, torch.device("cpu"))
    assert again.data_ptr() == first.data_ptr() and again.numel() == 50
    other_dtype = _workspace("test", 50, torch.float64, torch.device("cpu"))
    assert other_dtype.dtype == torch.float64 and other_dtype.data_ptr() != first.data_ptr()
    monkeypatch.setattr(cpu_attention, "WORKSPACE_MAX_BYTES", 100)  # 100 floats = 400 bytes: over the cap
    assert _workspace("test", 100, torch.float32, torch.device("cpu")).data_ptr() != first.data_ptr()
