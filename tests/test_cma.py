"""Unit tests of nnunetv2_caml.cma.CrossSampleMutualAttention."""
import pytest
import torch

from nnunetv2_caml.cma import CrossSampleMutualAttention

C = 8


def _cma(dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return CrossSampleMutualAttention(C, num_heads=4, dropout=dropout).double().train()


def _x(shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("shape", [(3, C, 4, 5), (3, C, 2, 3, 4)])
def test_eval_is_identity(shape):
    cma = CrossSampleMutualAttention(C, num_heads=4).eval()
    x = torch.randn(*shape)
    out = cma(x)
    assert torch.equal(out, x)


@pytest.mark.parametrize("shape", [(3, C, 4, 5), (2, C, 2, 3, 4)])
def test_train_keeps_shape_and_changes_values(shape):
    cma = CrossSampleMutualAttention(C, num_heads=4).train()  # default dropout on
    x = torch.randn(*shape, requires_grad=True)
    out = cma(x)
    assert out.shape == x.shape
    assert not torch.allclose(out, x)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in cma.parameters())


def test_defaults_follow_paper():
    cma = CrossSampleMutualAttention(C)
    for layer in (cma.intra_sample, cma.inter_sample):
        assert layer.self_attn.num_heads == 4
        assert layer.linear1.out_features == 4 * C
        assert layer.dropout.p == 0.5
        assert layer.norm_first is False
    assert cma.intra_sample is not cma.inter_sample
    assert cma.intra_sample.linear1.weight.data_ptr() != cma.inter_sample.linear1.weight.data_ptr()


def test_channels_not_divisible_by_heads_raises():
    with pytest.raises(ValueError):
        CrossSampleMutualAttention(10, num_heads=4)
    CrossSampleMutualAttention(12, num_heads=4)  # divisible: fine


@pytest.mark.parametrize("shape,pos", [((3, C, 3, 4, 2), (1, 2, 0)), ((4, C, 3, 5), (2, 3))])
def test_inter_sample_mixes_only_across_batch_at_one_position(shape, pos):
    cma = _cma()
    cma.intra_sample = torch.nn.Identity()
    x = _x(shape)
    x2 = x.clone()
    x2[(0, slice(None)) + pos] += 1.0  # perturb sample 0 at one voxel, all channels
    diff = (cma(x2) - cma(x)).abs().amax(dim=1)  # [B, *spatial]
    at = diff[(slice(None),) + pos]
    assert torch.all(at > 1e-6)  # every sample changes at that position
    mask = torch.ones_like(diff, dtype=torch.bool)
    mask[(slice(None),) + pos] = False
    assert torch.all(diff[mask] == 0)  # nowhere else


@pytest.mark.parametrize("shape,pos", [((3, C, 3, 4, 2), (1, 2, 0)), ((4, C, 3, 5), (2, 3))])
def test_intra_sample_mixes_only_within_sample(shape, pos):
    cma = _cma()
    cma.inter_sample = torch.nn.Identity()
    x = _x(shape)
    x2 = x.clone()
    x2[(0, slice(None)) + pos] += 1.0
    out, out2 = cma(x), cma(x2)
    assert torch.equal(out[1:], out2[1:])        # other samples exactly unchanged
    diff0 = (out2[0] - out[0]).abs().amax(0)
    assert torch.all(diff0 > 1e-9)               # attention spreads the change over all of sample 0's positions


def test_intra_sample_matches_per_sample_reference():
    cma = _cma()
    layer = cma.intra_sample
    cma.inter_sample = torch.nn.Identity()
    x = _x((3, C, 2, 3, 2))
    out = cma(x)
    for b in range(x.shape[0]):
        tokens = x[b].reshape(C, -1).T.unsqueeze(0)  # [1, voxels, C]
        ref = layer(tokens)[0].T.reshape(x.shape[1:])
        torch.testing.assert_close(out[b], ref, rtol=1e-10, atol=1e-12)


def test_inter_sample_matches_per_position_reference():
    cma = _cma()
    layer = cma.inter_sample
    cma.intra_sample = torch.nn.Identity()
    x = _x((3, C, 2, 3, 2))
    out = cma(x)
    for i in range(2):
        for j in range(3):
            for k in range(2):
                tokens = x[:, :, i, j, k].unsqueeze(0)  # [1, B, C]: the batch at one position
                torch.testing.assert_close(out[:, :, i, j, k], layer(tokens)[0], rtol=1e-10, atol=1e-12)


def test_full_cma_carries_information_across_samples():
    cma = _cma()
    x = _x((3, C, 3, 4, 2))
    x2 = x.clone()
    x2[0, :, 1, 2, 0] += 1.0
    out, out2 = cma(x), cma(x2)
    diff = (out2 - out).abs().amax(1)
    # intra spreads the change over sample 0, inter then carries it to every other sample at every position
    assert torch.all(diff[1:] > 1e-9)
    # and the order is intra then inter: equals the two layers applied by hand in that order
    intra, inter = cma.intra_sample, cma.inter_sample
    b, c = x.shape[:2]
    t = intra(x.reshape(b, c, -1).transpose(1, 2))        # [B, N, C]
    t = inter(t.transpose(0, 1).contiguous())             # [N, B, C]
    torch.testing.assert_close(out, t.permute(1, 2, 0).reshape(x.shape), rtol=1e-10, atol=1e-12)


def test_dropout_active_in_train_mode():
    cma = CrossSampleMutualAttention(C, num_heads=4).double().train()
    x = _x((2, C, 3, 3))
    torch.manual_seed(5)
    a = cma(x)
    torch.manual_seed(6)
    b = cma(x)
    assert not torch.allclose(a, b)
    torch.manual_seed(5)
    torch.testing.assert_close(cma(x), a)


def test_layers_compute_what_pytorch_transformer_layer_computes():
    # CMA's layers re-route self-attention (for a cheaper dropout mask on the CPU): without dropout they must give
    # exactly what nn.TransformerEncoderLayer gives with the same parameters
    torch.manual_seed(0)
    cma = CrossSampleMutualAttention(C, num_heads=4, dropout=0.0).double().train()
    reference = torch.nn.TransformerEncoderLayer(C, 4, 4 * C, dropout=0.0, batch_first=True).double().train()
    reference.load_state_dict(cma.intra_sample.state_dict())
    tokens = _x((3, 7, C))
    torch.testing.assert_close(cma.intra_sample(tokens), reference(tokens), rtol=1e-12, atol=1e-12)


def test_attention_dropout_drops_weights_with_probability_p_and_is_unbiased():
    from nnunetv2_caml.cma import self_attention

    torch.manual_seed(0)
    attention = torch.nn.MultiheadAttention(C, 4, dropout=0.5, batch_first=True).double()
    x = _x((2, 6, C))
    exact = self_attention(x, attention, training=False)
    torch.testing.assert_close(exact, attention.eval()(x, x, x, need_weights=False)[0])
    draws = torch.stack([self_attention(x, attention, training=True) for _ in range(2000)])
    assert not torch.allclose(draws[0], draws[1])
    # dropout rescales by 1/(1-p): the mean over many draws approaches the exact output
    torch.testing.assert_close(draws.mean(0), exact, rtol=0, atol=0.05)


@pytest.mark.parametrize("length,p", [(5, 0.5), (70, 0.5), (130, 0.3), (128, 0.5)])
def test_blockwise_dropout_attention_equals_the_whole_weight_form(length, p):
    # CPU attention with dropout, 64 query rows at a time, weights recomputed in the backward pass: output and
    # gradients must equal softmax(q k^T / sqrt(d)) * mask @ v with autograd, for the same mask, across block borders
    from nnunetv2_caml.cma import BlockwiseDropoutAttention, draw_keep_mask, keep_mask_rows

    torch.manual_seed(0)
    q, k, v = (_x((2, 3, length, 4), seed=s).requires_grad_() for s in (1, 2, 3))
    keep = draw_keep_mask((2, 3, length, length), p)
    mask = keep_mask_rows(keep, 0, length, length, p, torch.float64)
    assert set(mask.unique().tolist()) == {0.0, 1.0 / (1.0 - p)}
    grad_out = _x((2, 3, length, 4), seed=4)
    reference = (torch.softmax(q * 0.5 @ k.transpose(-2, -1), dim=-1) * mask) @ v
    out = BlockwiseDropoutAttention.apply(q, k, v, keep, p)
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    for ours, theirs in zip(torch.autograd.grad(out, (q, k, v), grad_out),
                            torch.autograd.grad(reference, (q, k, v), grad_out)):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("p", [0.5, 0.3])
def test_keep_mask_keeps_every_position_with_probability_one_minus_p(p):
    # the bit-packed mask (p = 0.5) must not favour any bit of a byte: each column position is kept half the time
    from nnunetv2_caml.cma import draw_keep_mask, keep_mask_rows

    torch.manual_seed(0)
    mask = keep_mask_rows(draw_keep_mask((4000, 8, 13), p), 0, 8, 13, p, torch.float64)
    assert mask.shape == (4000, 8, 13)
    kept = (mask > 0).double().mean(0)  # per row and column position
    torch.testing.assert_close(kept, torch.full_like(kept, 1 - p), rtol=0, atol=0.04)


def test_cpu_dropout_is_unbiased_and_drops_half():
    from nnunetv2_caml.cma import dropout

    torch.manual_seed(0)
    x = _x((3, 5, 9)) + 3.0
    draws = torch.stack([dropout(x, 0.5, training=True) for _ in range(4000)])
    assert ((draws == 0).double().mean() - 0.5).abs() < 0.01
    # dropout rescales by 2: the mean over the draws approaches x (its standard error here is at most about 0.1)
    torch.testing.assert_close(draws.mean(0), x, rtol=0, atol=0.4)
    assert torch.equal(dropout(x, 0.5, training=False), x)
