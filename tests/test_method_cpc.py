"""CPC (van den Oord et al. 2018) on images: the patch grid, the row-causal context, the InfoNCE over all other
patches of the batch against a loop transcription, the representation, and training runs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from instdisc_lite.config import TrainConfig
from instdisc_lite.infonce import info_nce
from instdisc_lite.methods import METHODS, build_method
from instdisc_lite.methods.cpc import CPC, RowCausalConv, RowContext, cpc_logits
from instdisc_lite.patches import grid_shape, patch_grid


def small_config(**overrides) -> TrainConfig:
    values = dict(method="cpc", arch="small_cnn_fast", low_dim=16, patch_size=8, patch_stride=4,
                  prediction_steps=2, temperature=1.0)  # fmt: skip
    return TrainConfig(**{**values, **overrides})


# ---------------------------------------------------------------------------------------------------------------
# The patch grid
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("side", "cells"), [(28, 6), (32, 7), (30, 6)])
def test_grid_shape(side, cells):
    assert grid_shape(side, side, 8, 4) == (cells, cells)
    assert patch_grid(torch.zeros(2, 3, side, side), 8, 4).shape == (2, cells, cells, 3, 8, 8)


def test_grid_of_a_rectangle_and_bad_sizes():
    assert grid_shape(32, 20, 8, 4) == (7, 4)
    with pytest.raises(ValueError, match="does not fit"):
        grid_shape(6, 32, 8, 4)
    with pytest.raises(ValueError, match=">= 1"):
        grid_shape(32, 32, 8, 0)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        patch_grid(torch.zeros(3, 32, 32), 8, 4)


def test_patch_r_c_is_the_crop_at_r_stride_c_stride(seeded):
    images = torch.randn(2, 3, 30, 26)
    size, stride = 8, 4
    grid = patch_grid(images, size, stride)
    rows, cols = grid_shape(30, 26, size, stride)
    assert grid.shape == (2, rows, cols, 3, size, size)
    for r in range(rows):
        for c in range(cols):
            crop = images[:, :, r * stride : r * stride + size, c * stride : c * stride + size]
            assert torch.equal(grid[:, r, c], crop), (r, c)


# ---------------------------------------------------------------------------------------------------------------
# The context sees rows <= r only
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", [(2, 3), (3, 3)])
def test_row_causal_conv_ignores_the_rows_below(seeded, kernel):
    conv = RowCausalConv(4, kernel)
    x = torch.randn(2, 4, 6, 5)
    for r in range(5):
        y = x.clone()
        y[:, :, r + 1 :] = torch.randn_like(y[:, :, r + 1 :])
        a, b = conv(x), conv(y)
        assert a.shape == x.shape
        assert torch.equal(a[:, :, : r + 1], b[:, :, : r + 1]), r
        assert not torch.allclose(a[:, :, r + 1], b[:, :, r + 1])  # the row below does read its own row


def test_context_at_row_r_does_not_depend_on_rows_below(seeded):
    context = RowContext(8, 12, layers=3)
    z = torch.randn(2, 6, 5, 8)
    for r in range(5):
        lower = z.clone()
        lower[:, r + 1 :] = torch.randn_like(lower[:, r + 1 :])
        a, b = context(z), context(lower)
        assert a.shape == (2, 6, 5, 12)
        assert torch.equal(a[:, : r + 1], b[:, : r + 1]), r
        assert not torch.allclose(a[:, r + 1 :], b[:, r + 1 :])


def test_context_reaches_the_rows_above_and_neighbouring_columns(seeded):
    context = RowContext(4, 6, layers=3, kernel=(2, 3))
    z = torch.randn(1, 6, 6, 4)
    moved = z.clone()
    moved[0, 1, 4] += 1.0  # a patch 3 rows up and 2 columns across from (4, 2): inside 3 layers of (2, 3)
    assert not torch.allclose(context(z)[0, 4, 2], context(moved)[0, 4, 2])


def test_image_context_of_upper_rows_ignores_lower_pixels(seeded):
    """End to end, in eval mode (BN on running statistics): changing the pixels below patch row r changes no
    patch embedding of rows <= r, nor their context."""
    method = CPC(small_config(), num_items=10, in_channels=1).eval()
    images = torch.randn(3, 1, 28, 28)
    r = 2  # patch row 2 covers pixel rows 8..15
    changed = images.clone()
    changed[:, :, r * 4 + 8 :] = torch.randn_like(changed[:, :, r * 4 + 8 :])
    with torch.no_grad():
        za, zb = method.encoder.patch_embeddings(images), method.encoder.patch_embeddings(changed)
        ca, cb = method.context(za), method.context(zb)
    assert torch.equal(za[:, : r + 1], zb[:, : r + 1])
    assert torch.equal(ca[:, : r + 1], cb[:, : r + 1])
    assert not torch.allclose(ca[:, r + 1 :], cb[:, r + 1 :])


# ---------------------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------------------


def loop_cpc_loss(z: torch.Tensor, context: torch.Tensor, weights: list[torch.Tensor], tau: float) -> float:
    """Eq. 4 written out: for every k, b, r < R - k, c the unit prediction p = W_k c_{b,r,c} / |W_k c_{b,r,c}| scores
    its target z_{b,r+k,c} against every patch of the batch (the target once, all B*R*C - 1 others as negatives)."""
    B, R, C, _ = z.shape
    terms = []
    for k, w in enumerate(weights, 1):
        for b in range(B):
            for r in range(R - k):
                for c in range(C):
                    p = [sum(w[i, j].item() * context[b, r, c, j].item() for j in range(w.shape[1]))
                         for i in range(w.shape[0])]  # fmt: skip
                    norm = math.sqrt(sum(pi * pi for pi in p))
                    p = [pi / norm for pi in p]  # the unit prediction

                    def score(v: torch.Tensor, p=p) -> float:
                        return sum(pi * vi for pi, vi in zip(p, v.tolist(), strict=True)) / tau

                    positive = score(z[b, r + k, c])
                    denominator = sum(
                        math.exp(score(z[b2, r2, c2])) for b2 in range(B) for r2 in range(R) for c2 in range(C)
                    )
                    terms.append(-(positive - math.log(denominator)))
    return sum(terms) / len(terms)


@pytest.mark.parametrize(("steps", "tau"), [(1, 1.0), (2, 0.5), (3, 1.0)])
def test_loss_equals_loop_transcription(seeded, steps, tau):
    B, R, C, d, h = 2, 4, 3, 5, 6
    z = nn.functional.normalize(torch.randn(B, R, C, d), dim=-1)
    context = torch.randn(B, R, C, h)
    predictors = nn.ModuleList(nn.Linear(h, d, bias=False) for _ in range(steps))
    logits = cpc_logits(z, context, predictors, tau)
    assert logits.shape == (B * C * sum(R - k for k in range(1, steps + 1)), 1 + B * R * C)
    assert torch.isinf(logits).sum(dim=1).eq(1).all()  # the positive masked once among the candidates
    expected = loop_cpc_loss(z.double(), context.double(), [p.weight.double() for p in predictors], tau)
    assert info_nce(logits).item() == pytest.approx(expected, rel=1e-5)


def test_method_forward_equals_loop_over_its_patch_embeddings(seeded):
    config = small_config(low_dim=6, temperature=0.5)
    method = CPC(config, num_items=10, in_channels=1).eval()
    images = torch.randn(2, 1, 20, 16)  # a 4 x 3 grid
    loss = method([images], torch.arange(2))
    with torch.no_grad():
        z = method.encoder.patch_embeddings(images)
        context = method.context(z)
    assert z.shape == (2, 4, 3, 6)
    assert z.norm(dim=-1).sub(1).abs().max() < 1e-5  # unit z
    weights = [p.weight.double() for p in method.predictors]
    assert loss.item() == pytest.approx(loop_cpc_loss(z.double(), context.double(), weights, 0.5), rel=1e-5)


def test_loss_is_the_log_of_the_candidates_when_nothing_is_learnt():
    """Equal scores everywhere: the loss is log(B*R*C), the softmax over the positive and B*R*C - 1 negatives."""
    B, R, C, d = 3, 5, 4, 4
    z = torch.zeros(B, R, C, d)
    predictors = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(2))
    loss = info_nce(cpc_logits(z, torch.randn(B, R, C, d), predictors, 1.0))
    assert loss.item() == pytest.approx(math.log(B * R * C))


def test_too_many_prediction_steps_for_the_grid():
    method = CPC(small_config(prediction_steps=6), num_items=10, in_channels=1)
    with pytest.raises(ValueError, match="prediction_steps=6"):
        method([torch.randn(2, 1, 28, 28)], torch.arange(2))  # 6 rows: at most 5 steps


def test_gradients_reach_encoder_context_and_predictors(seeded):
    method = CPC(small_config(), num_items=10, in_channels=1)
    method([torch.randn(4, 1, 28, 28)], torch.arange(4)).backward()
    for name, p in method.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------------------------------------------
# The method's interface
# ---------------------------------------------------------------------------------------------------------------


def test_registered_with_its_interface():
    assert METHODS["cpc"] is CPC
    method = build_method(small_config(), num_items=10, in_channels=3)
    assert (method.name, method.num_views, method.bank) == ("cpc", 1, None)
    assert len(method.predictors) == 2


def test_representation_is_the_mean_patch_embedding(seeded):
    method = CPC(small_config(low_dim=16), num_items=10, in_channels=3).eval()
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        features = method.encoder(images)
        z = method.encoder.patch_embeddings(images)
    assert z.shape == (5, 7, 7, 16)
    assert features.shape == (5, 16)
    torch.testing.assert_close(features, z.mean(dim=(1, 2)))


def test_after_step_changes_nothing(seeded):
    """CPC owns no update outside the gradient (no bank, no queue)."""
    method = CPC(small_config(), num_items=10, in_channels=1)
    method([torch.randn(4, 1, 28, 28)], torch.arange(4))
    before = {k: v.clone() for k, v in method.state_dict().items()}
    method.after_step()
    assert all(torch.equal(before[k], v) for k, v in method.state_dict().items())


# ---------------------------------------------------------------------------------------------------------------
# End to end through the trainer
# ---------------------------------------------------------------------------------------------------------------


def test_shipped_configs_are_cpc_with_their_grids():
    from instdisc_lite import load_config

    cifar, quick = load_config("cpc_cifar10"), load_config("cpc_fashion_mnist_quick")
    assert (cifar.method, cifar.patch_size, cifar.patch_stride, cifar.prediction_steps) == ("cpc", 8, 4, 3)
    assert grid_shape(32, 32, cifar.patch_size, cifar.patch_stride) == (7, 7)
    assert (quick.method, quick.arch, quick.dataset) == ("cpc", "small_cnn_fast", "fashion_mnist")
    assert quick.prediction_steps < grid_shape(28, 28, quick.patch_size, quick.patch_stride)[0]


def test_one_step_of_the_cifar10_config(tiny_cifar10, tmp_path):
    from instdisc_lite import train

    run = train(
        "cpc_cifar10",
        overrides=dict(data_root=str(tiny_cifar10["root"]), out_dir=str(tmp_path), epochs=1, max_steps_per_epoch=1,
                       batch_size=4, num_workers=0, progress=False, device="cpu", arch="small_cnn"),
    )  # fmt: skip
    assert isinstance(run.method, CPC) and run.method.bank is None
    loss = run.metrics[-1]["loss"]
    # one step from the untrained network: near log(B*R*C), the uniform guess over 4 x 49 candidates
    assert math.isfinite(loss) and abs(loss - math.log(4 * 49)) < 2.0, loss
    assert math.isfinite(run.final["knn_top1"])


def test_short_fashion_mnist_run_beats_the_untrained_network(fashion_mnist_available, tmp_path):
    from instdisc_lite import load_config, train
    from instdisc_lite.train import build_run, evaluate_final

    overrides = dict(data_root=str(fashion_mnist_available), out_dir=str(tmp_path), train_subset=1024, epochs=2,
                     eval_every=2, eval_subset=1000, progress=False, device="cpu")  # fmt: skip
    untrained = evaluate_final(build_run(load_config("cpc_fashion_mnist_quick", overrides)))
    run = train("cpc_fashion_mnist_quick", overrides=overrides)
    assert run.final["knn_top1"] > untrained["knn_top1"] + 1.0, (run.final, untrained)
