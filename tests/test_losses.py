"""Unit tests of nnunetv2_caml.losses, checked by hand or against independent reference computations."""
import math

import numpy as np
import pytest
import torch

from nnunetv2_caml.losses import (correlation_columns, mutual_consistency_loss, omni_correlation_consistency,
                                  omni_correlation_consistency_loss, omni_correlation_matrix, sharpen, sigmoid_rampup,
                                  soft_dice_loss)


def _random_probs(shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(*shape, generator=g, dtype=dtype), dim=1)


def _np_sharpen(p: np.ndarray, temperature: float) -> np.ndarray:
    """Reference sharpening over axis 1, written with plain powers (no log space)."""
    powered = p ** (1.0 / temperature)
    return powered / powered.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------------------------------------- sharpen
def test_sharpen_two_class_matches_paper_formula():
    p = torch.tensor([0.01, 0.2, 0.45, 0.5, 0.55, 0.7, 0.93, 0.999], dtype=torch.float64)
    probs = torch.stack([1 - p, p], dim=1)[..., None]  # [8, 2, 1]: class 1 has probability p
    for temperature in (0.1, 0.5, 1.0, 2.0):
        out = sharpen(probs, temperature)
        for i, pi in enumerate(p.tolist()):
            a = pi ** (1 / temperature)
            b = (1 - pi) ** (1 / temperature)
            expected = a / (a + b)
            assert out[i, 1, 0].item() == pytest.approx(expected, rel=1e-10, abs=1e-300)
            assert out[i, 0, 0].item() == pytest.approx(1 - expected, rel=1e-10, abs=1e-12)


def test_sharpen_multiclass_hand_values():
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.6, 0.2]], dtype=torch.float64)
    # T = 0.5 squares: [0.25, 0.0625, 0.0625] / 0.375 and [0.04, 0.36, 0.04] / 0.44
    out = sharpen(probs, 0.5)
    expected = torch.tensor([[2 / 3, 1 / 6, 1 / 6], [1 / 11, 9 / 11, 1 / 11]], dtype=torch.float64)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # T = 1 leaves a distribution unchanged
    torch.testing.assert_close(sharpen(probs, 1.0), probs, rtol=1e-12, atol=1e-12)


def test_sharpen_reduces_entropy_and_keeps_argmax():
    probs = _random_probs((3, 4, 5, 6))
    out = sharpen(probs, 0.1)
    assert torch.equal(out.argmax(1), probs.argmax(1))
    ent = lambda q: -(q * torch.log(q.clamp_min(1e-300))).sum(1)
    assert torch.all(ent(out) <= ent(probs) + 1e-12)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5, 6), (2, 4, 7, 5)])
def test_sharpen_shape_and_normalisation(shape):
    probs = _random_probs(shape, seed=1)
    out = sharpen(probs, 0.1)
    assert out.shape == probs.shape
    torch.testing.assert_close(out.sum(1), torch.ones(shape[:1] + shape[2:], dtype=torch.float64))
    torch.testing.assert_close(out, torch.from_numpy(_np_sharpen(probs.numpy(), 0.1)), rtol=1e-9, atol=1e-12)


def test_sharpen_tiny_temperature_is_finite():
    probs = torch.tensor([[0.6, 0.4], [0.5 + 1e-4, 0.5 - 1e-4], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float32)
    out = sharpen(probs, 0.01)  # 0.6^100 / 0.4^100 would overflow/underflow naively in float32
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.sum(1), torch.ones(4))
    assert out[0, 0].item() == pytest.approx(1.0, abs=1e-6)       # (1.5)^100 ~ 4e17
    expected_close = 1 / (1 + ((0.5 - 1e-4) / (0.5 + 1e-4)) ** 100)  # ratio^100 ~ 0.96
    assert out[1, 0].item() == pytest.approx(expected_close, abs=1e-4)
    torch.testing.assert_close(out[2:], probs[2:])                  # one-hot stays one-hot


@pytest.mark.parametrize("temperature", [0.0, -0.1])
def test_sharpen_invalid_temperature_raises(temperature):
    with pytest.raises(ValueError):
        sharpen(_random_probs((1, 2, 3)), temperature)


# --------------------------------------------------------------------------------------------- mutual consistency
def test_mutual_consistency_equals_explicit_formula():
    pm = _random_probs((2, 3, 4, 3, 2), seed=2)
    pa = _random_probs((2, 3, 4, 3, 2), seed=3)
    for temperature in (0.1, 0.5):
        loss = mutual_consistency_loss(pm, pa, temperature=temperature)
        a, b = pm.numpy(), pa.numpy()
        expected = (np.mean((a - _np_sharpen(b, temperature)) ** 2)
                    + np.mean((b - _np_sharpen(a, temperature)) ** 2))
        assert loss.ndim == 0
        assert loss.item() == pytest.approx(expected, rel=1e-9)
    # default temperature is 0.1
    assert mutual_consistency_loss(pm, pa).item() == pytest.approx(
        mutual_consistency_loss(pm, pa, temperature=0.1).item(), rel=1e-12)


def test_mutual_consistency_zero_for_identical_one_hot():
    labels = torch.tensor([[0, 2, 1], [1, 1, 0]])
    onehot = torch.nn.functional.one_hot(labels, 3).permute(0, 2, 1).to(torch.float64)  # [2, 3, 3]
    assert mutual_consistency_loss(onehot, onehot.clone()).item() == pytest.approx(0.0, abs=1e-12)
    # but not zero when the one-hot predictions disagree: each of the two MSEs is 2 * 1 / 18 per wrong voxel
    other = onehot.clone()
    other[0, :, 0] = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    assert mutual_consistency_loss(onehot, other).item() == pytest.approx(2 * 2 / 18, rel=1e-9)


def _grads(pm, pa, detach):
    pm = pm.clone().requires_grad_(True)
    pa = pa.clone().requires_grad_(True)
    mutual_consistency_loss(pm, pa, temperature=0.5, detach_targets=detach).backward()
    return pm.grad, pa.grad


def test_mutual_consistency_gradients_default_flow_through_targets():
    pm0 = _random_probs((2, 3, 5), seed=4)
    pa0 = _random_probs((2, 3, 5), seed=5)
    gm, ga = _grads(pm0, pa0, detach=False)
    assert gm is not None and ga is not None
    # independent reference: autograd through an explicitly written loss (plain powers, no log space)
    pm = pm0.clone().requires_grad_(True)
    pa = pa0.clone().requires_grad_(True)

    def s(p):
        q = p ** 2.0  # 1 / T with T = 0.5
        return q / q.sum(1, keepdim=True)

    n = pm.numel()
    (((pm - s(pa)) ** 2).sum() / n + ((pa - s(pm)) ** 2).sum() / n).backward()
    torch.testing.assert_close(gm, pm.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ga, pa.grad, rtol=1e-9, atol=1e-12)


def test_mutual_consistency_detach_targets_stops_target_path():
    pm0 = _random_probs((2, 3, 5), seed=6)
    pa0 = _random_probs((2, 3, 5), seed=7)
    gm_det, ga_det = _grads(pm0, pa0, detach=True)
    gm_full, ga_full = _grads(pm0, pa0, detach=False)
    n = pm0.numel()
    # with detached targets only the direct path remains: d/dp mean((p - t)^2) = 2 (p - t) / n
    torch.testing.assert_close(gm_det, 2 * (pm0 - torch.from_numpy(_np_sharpen(pa0.numpy(), 0.5))) / n,
                               rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ga_det, 2 * (pa0 - torch.from_numpy(_np_sharpen(pm0.numpy(), 0.5))) / n,
                               rtol=1e-9, atol=1e-12)
    # and the default carries an additional, non-zero gradient through the sharpened target
    assert (gm_full - gm_det).abs().max() > 1e-6
    assert (ga_full - ga_det).abs().max() > 1e-6
    # when probs_main equals the sharpened aux prediction, the direct path carries no gradient to probs_main:
    # all of its gradient then comes through the sharpened target, which detach_targets must stop
    pa = _random_probs((2, 3, 5), seed=8)
    pm = torch.from_numpy(_np_sharpen(pa.numpy(), 0.5))
    gm_det, _ = _grads(pm, pa, detach=True)
    gm_full, _ = _grads(pm, pa, detach=False)
    assert gm_det.abs().max() < 1e-12
    assert gm_full.abs().max() > 1e-4


def test_mutual_consistency_cross_entropy_value_and_logit_gradient():
    logits_main = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    logits_aux = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    lm, la = logits_main.clone().requires_grad_(True), logits_aux.clone().requires_grad_(True)
    pm, pa = torch.softmax(lm, 1), torch.softmax(la, 1)
    loss = mutual_consistency_loss(pm, pa, temperature=0.5, detach_targets=True, distance="ce")
    tm = _np_sharpen(pa.detach().numpy(), 0.5)  # target of the main network
    ta = _np_sharpen(pm.detach().numpy(), 0.5)
    voxels = 2 * 5
    reference = (-(tm * np.log(pm.detach().numpy())).sum() - (ta * np.log(pa.detach().numpy())).sum()) / voxels
    assert loss.item() == pytest.approx(reference, rel=1e-9)
    loss.backward()
    # cross-entropy against a detached target: d/dlogits = (p - t) / voxels, however confident p is
    torch.testing.assert_close(lm.grad, (pm.detach() - torch.from_numpy(tm)) / voxels, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(la.grad, (pa.detach() - torch.from_numpy(ta)) / voxels, rtol=1e-9, atol=1e-12)


def test_mutual_consistency_cross_entropy_corrects_confident_errors_where_mse_does_not():
    # the main network is confidently wrong on one voxel, the auxiliary network confidently right
    logits_main = torch.tensor([[[8.0], [-8.0]]], dtype=torch.float64, requires_grad=True)
    probs_aux = torch.tensor([[[0.02], [0.98]]], dtype=torch.float64)
    grads = {}
    for distance in ("mse", "ce"):
        logits_main.grad = None
        mutual_consistency_loss(torch.softmax(logits_main, 1), probs_aux, detach_targets=True,
                                distance=distance).backward()
        grads[distance] = logits_main.grad.abs().max().item()
    assert grads["ce"] > 0.9
    assert grads["mse"] < 0.01


def _np_foreground_dice(p: np.ndarray, t: np.ndarray, axes) -> np.ndarray:
    """Reference soft Dice per foreground class (classes 1..), smooth 1e-5 as nnU-Net's."""
    return ((2 * (p * t).sum(axes) + 1e-5) / (p.sum(axes) + t.sum(axes) + 1e-5))[..., 1:]


@pytest.mark.parametrize("batch_dice", [False, True])
def test_soft_dice_loss_hand_values(batch_dice):
    # two samples, background + 2 foreground classes, 4 voxels
    p = _random_probs((2, 3, 4), seed=3).numpy()
    t = _np_sharpen(_random_probs((2, 3, 4), seed=4).numpy(), 0.3)
    axes = (0, 2) if batch_dice else (2,)
    expected = 1 - _np_foreground_dice(p, t, axes).mean()
    assert soft_dice_loss(torch.from_numpy(p), torch.from_numpy(t), batch_dice).item() == \
        pytest.approx(expected, rel=1e-12)


def test_soft_dice_loss_of_equal_one_hot_maps_is_zero_and_ignores_background():
    labels = torch.tensor([[0, 1, 1, 2, 0, 0]])
    one_hot = torch.nn.functional.one_hot(labels, 3).permute(0, 2, 1).double()
    assert soft_dice_loss(one_hot, one_hot).item() == pytest.approx(0.0, abs=1e-12)
    # swapping background voxels for class 1 costs only class 1's Dice: background is not scored
    wrong = one_hot.clone()
    wrong[0, :, 0] = torch.tensor([0.0, 1.0, 0.0])
    assert soft_dice_loss(wrong, one_hot).item() == pytest.approx(1 - (4 / 5 + 1) / 2, rel=1e-5)


def test_mutual_consistency_dice_ce_is_ce_plus_dice_of_sharpened_targets():
    pm, pa = _random_probs((2, 2, 3, 4), seed=5), _random_probs((2, 2, 3, 4), seed=6)
    for batch_dice in (False, True):
        loss = mutual_consistency_loss(pm, pa, temperature=0.1, detach_targets=True, distance="dice_ce",
                                       batch_dice=batch_dice)
        ce = mutual_consistency_loss(pm, pa, temperature=0.1, detach_targets=True, distance="ce")
        tm, ta = _np_sharpen(pa.numpy(), 0.1), _np_sharpen(pm.numpy(), 0.1)
        axes = (0, 2, 3) if batch_dice else (2, 3)
        dice = sum(1 - _np_foreground_dice(p, t, axes).mean() for p, t in ((pm.numpy(), tm), (pa.numpy(), ta)))
        assert loss.item() == pytest.approx(ce.item() + dice, rel=1e-9)


def test_mutual_consistency_dice_ce_pulls_a_missed_small_structure_harder_than_ce():
    # 1000 voxels, a 10-voxel structure the auxiliary network finds and the main network misses
    logits_main = torch.zeros(1, 2, 1000, dtype=torch.float64)
    logits_main[0, 0] = 4.0  # background everywhere, confidently
    probs_aux = torch.full((1, 2, 1000), 0.02, dtype=torch.float64)
    probs_aux[0, 0] = 0.98
    probs_aux[0, :, :10] = torch.tensor([[0.02], [0.98]], dtype=torch.float64)
    grads = {}
    for distance in ("ce", "dice_ce"):
        logits = logits_main.clone().requires_grad_(True)
        mutual_consistency_loss(torch.softmax(logits, 1), probs_aux, detach_targets=True,
                                distance=distance).backward()
        grads[distance] = logits.grad[0, 1, :10].mean().item()  # descent raises the foreground logit there
    assert grads["ce"] < 0 and grads["dice_ce"] < 2 * grads["ce"]  # the Dice term more than doubles the pull


def test_mutual_consistency_rejects_unknown_distance():
    p = _random_probs((1, 2, 3))
    with pytest.raises(ValueError, match="'mse' or 'ce'"):
        mutual_consistency_loss(p, p, distance="l1")


# -------------------------------------------------------------------------------------------------------- ramp-up
def test_sigmoid_rampup_values():
    assert sigmoid_rampup(0, 10) == pytest.approx(math.exp(-5), rel=1e-12)
    assert sigmoid_rampup(10, 10) == pytest.approx(1.0, rel=1e-12)
    assert sigmoid_rampup(25, 10) == pytest.approx(1.0, rel=1e-12)
    assert sigmoid_rampup(3, 0) == 1.0
    assert sigmoid_rampup(0, 0) == 1.0
    # mid values by hand: phase 1 - 5/10 = 0.5 -> exp(-1.25); phase 1 - 2/8 = 0.75 -> exp(-2.8125)
    assert sigmoid_rampup(5, 10) == pytest.approx(0.28650479686019010, rel=1e-12)
    assert sigmoid_rampup(2, 8) == pytest.approx(0.060054667895307945, rel=1e-12)
    assert sigmoid_rampup(150.0, 200.0) == pytest.approx(math.exp(-5 * 0.25 ** 2), rel=1e-12)
    assert isinstance(sigmoid_rampup(5, 10), float)


def test_sigmoid_rampup_monotone_non_decreasing():
    values = [sigmoid_rampup(t, 40) for t in range(0, 60)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[0] < values[20] < values[40] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------- omni-correlation
def _reference_matrix(features, row_indices, memory_rows, temperature):
    """Explicit per-row softmax(f . m / tau) with Python loops."""
    out = []
    for i in row_indices:
        f = features[i].tolist()
        logits = [sum(a * b for a, b in zip(f, m.tolist())) / temperature for m in memory_rows]
        top = max(logits)
        exps = [math.exp(v - top) for v in logits]
        total = sum(exps)
        out.append([e / total for e in exps])
    return torch.tensor(out, dtype=torch.float64)


def _occ_inputs(seed=0, d=4):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(7, d, generator=g, dtype=torch.float64)
    pseudo_label = torch.tensor([1, 0, 1, 0, 2, 1, 1])
    confidence = torch.tensor([0.5, 0.9, 0.8, 0.3, 0.7, 0.95, 0.6], dtype=torch.float64)
    memory = [torch.randn(3, d, generator=g, dtype=torch.float64),
              torch.randn(2, d, generator=g, dtype=torch.float64),
              torch.randn(4, d, generator=g, dtype=torch.float64)]
    return features, confidence, pseudo_label, memory


def test_omni_correlation_matrix_order_and_values():
    features, confidence, pseudo_label, memory = _occ_inputs()
    out = omni_correlation_matrix(features, confidence, pseudo_label, memory, temperature=0.1)
    # class 0: voxels 1 (0.9), 3 (0.3); class 1: 5 (0.95), 2 (0.8), 6 (0.6), 0 (0.5); class 2: only voxel 4 -> no rows
    expected_rows = [1, 3, 5, 2, 6, 0]
    columns = list(memory[0]) + list(memory[1]) + list(memory[2])
    assert out.shape == (6, 9)
    torch.testing.assert_close(out, _reference_matrix(features, expected_rows, columns, 0.1), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.sum(1), torch.ones(6, dtype=torch.float64))


def test_omni_correlation_matrix_rows_identifiable():
    # each feature row is one-hot at its own index, memory columns are scaled unit vectors: row r of the output
    # then peaks at the column of the feature's own index, which identifies which voxel a row came from
    n = 6
    features = torch.eye(n, dtype=torch.float64)
    pseudo_label = torch.tensor([1, 1, 0, 1, 0, 0])
    confidence = torch.tensor([0.2, 0.9, 0.4, 0.5, 0.8, 0.1], dtype=torch.float64)
    memory = [torch.eye(n, dtype=torch.float64)[:3] * 5, torch.eye(n, dtype=torch.float64)[3:] * 5]
    out = omni_correlation_matrix(features, confidence, pseudo_label, memory, temperature=1.0)
    # class 0: voxels 4 (0.8), 2 (0.4), 5 (0.1); class 1: 1 (0.9), 3 (0.5), 0 (0.2)
    assert out.argmax(1).tolist() == [4, 2, 5, 1, 3, 0]


def test_omni_correlation_matrix_top_k_per_class():
    features, confidence, pseudo_label, memory = _occ_inputs(seed=1)
    out = omni_correlation_matrix(features, confidence, pseudo_label, memory, temperature=0.5, top_k=2)
    columns = list(memory[0]) + list(memory[1]) + list(memory[2])
    expected_rows = [1, 3, 5, 2]  # class 1 truncated to its two most confident voxels
    assert out.shape == (4, 9)
    torch.testing.assert_close(out, _reference_matrix(features, expected_rows, columns, 0.5), rtol=1e-9, atol=1e-12)
    out1 = omni_correlation_matrix(features, confidence, pseudo_label, memory, temperature=0.5, top_k=1)
    # top_k = 1 still takes one row of each class that has >= 2 candidates
    torch.testing.assert_close(out1, _reference_matrix(features, [1, 5], columns, 0.5), rtol=1e-9, atol=1e-12)


def test_omni_correlation_matrix_memory_classes_left_out():
    features, confidence, pseudo_label, memory = _occ_inputs(seed=2)
    single = memory[1][:1]
    for mem1 in (None, single):
        mem = [memory[0], mem1, memory[2]]
        out = omni_correlation_matrix(features, confidence, pseudo_label, mem, temperature=0.1)
        columns = list(memory[0]) + list(memory[2])
        assert out.shape == (6, 7)
        torch.testing.assert_close(out, _reference_matrix(features, [1, 3, 5, 2, 6, 0], columns, 0.1),
                                   rtol=1e-9, atol=1e-12)


def test_omni_correlation_matrix_returns_none():
    features, confidence, _, memory = _occ_inputs()
    # no class has >= 2 candidates
    few = torch.tensor([0, 1, 2, 5, 5, 5, 5])  # label 5 is beyond the memory's classes
    assert omni_correlation_matrix(features, confidence, few, memory) is None
    # no usable memory class
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    assert omni_correlation_matrix(features, confidence, labels, [None, None, None]) is None
    assert omni_correlation_matrix(features, confidence, labels, [memory[0][:1], None, memory[2][:1]]) is None
    # empty input
    assert omni_correlation_matrix(features[:0], confidence[:0], labels[:0], memory) is None


def test_omni_correlation_matrix_gradient_and_dtype():
    features, confidence, pseudo_label, memory = _occ_inputs(seed=3)
    features = features.clone().requires_grad_(True)
    mem32 = [m.float() for m in memory]
    out = omni_correlation_matrix(features, confidence, pseudo_label, mem32, temperature=0.1)
    assert out.dtype == torch.float64
    out[:, 0].sum().backward()
    assert features.grad is not None
    # voxel 4 (class 2, a single candidate) takes no part
    assert torch.all(features.grad[4] == 0)
    assert features.grad[[0, 1, 2, 3, 5, 6]].abs().sum() > 0


def test_omni_correlation_consistency_loss_explicit():
    g = torch.Generator().manual_seed(0)
    target = torch.softmax(torch.randn(5, 7, generator=g, dtype=torch.float64), 1)
    pred = torch.softmax(torch.randn(5, 7, generator=g, dtype=torch.float64), 1)
    loss = omni_correlation_consistency_loss(target, pred)
    expected = 0.0
    for r in range(5):
        for c in range(7):
            expected += -target[r, c].item() * math.log(pred[r, c].item() + 1e-8)
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(expected / 5, rel=1e-10)


def test_omni_correlation_consistency_loss_entropy_when_equal():
    p = torch.tensor([[0.5, 0.5, 0.0], [0.25, 0.25, 0.5]], dtype=torch.float64)
    # entropies: ln 2 and 1.5 ln 2 (the zero entry contributes nothing)
    loss = omni_correlation_consistency_loss(p, p)
    assert loss.item() == pytest.approx((math.log(2) + 1.5 * math.log(2)) / 2, rel=1e-6)
    one_hot = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert omni_correlation_consistency_loss(one_hot, one_hot).item() == pytest.approx(0.0, abs=1e-7)


def test_omni_correlation_consistency_loss_shape_mismatch_raises():
    with pytest.raises(ValueError):
        omni_correlation_consistency_loss(torch.full((3, 4), 0.25), torch.full((3, 5), 0.2))


@pytest.mark.parametrize("rows_per_block", [None, 1, 7, 64, 1000])
def test_blockwise_omni_correlation_consistency_equals_the_papers_form(rows_per_block):
    # value and both gradients of the blockwise L_o equal L_o on the whole softmax matrices; temperature 0.1 with
    # widely spread embeddings puts many correlations below the loss's 1e-8, where log(C + 1e-8) saturates
    g = torch.Generator().manual_seed(4)
    target = (3 * torch.randn(150, 8, generator=g, dtype=torch.float64)).requires_grad_(True)
    pred = (3 * torch.randn(150, 8, generator=g, dtype=torch.float64)).requires_grad_(True)
    memory = [torch.randn(20, 8, generator=g, dtype=torch.float64), None,
              torch.randn(1, 8, generator=g, dtype=torch.float64), torch.randn(13, 8, generator=g, dtype=torch.float64)]
    columns = correlation_columns(memory)
    assert columns.shape == (33, 8)  # the class with one entry and the empty one contribute no column
    corr = [torch.softmax(e @ columns.T / 0.1, 1) for e in (target, pred)]
    assert (corr[1] < 1e-8).float().mean() > 0.1
    reference = omni_correlation_consistency_loss(*corr)
    reference_grads = torch.autograd.grad(reference, (target, pred))
    loss = omni_correlation_consistency(target, pred, columns, 0.1, rows_per_block)
    grads = torch.autograd.grad(3 * loss, (target, pred))
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=0)
    for got, expected in zip(grads, reference_grads):
        torch.testing.assert_close(got, 3 * expected, rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(omni_correlation_consistency(target, pred, columns, 0.1, rows_per_block), reference)


def test_blockwise_omni_correlation_consistency_takes_the_bank_as_a_constant():
    g = torch.Generator().manual_seed(5)
    embeddings = torch.randn(10, 4, generator=g, requires_grad=True)
    memory = torch.randn(6, 4, generator=g, requires_grad=True)
    omni_correlation_consistency(embeddings, embeddings * 2, memory, 0.1).backward()
    assert memory.grad is None and embeddings.grad.abs().sum() > 0
    assert correlation_columns([None, torch.zeros(1, 4)]) is None
