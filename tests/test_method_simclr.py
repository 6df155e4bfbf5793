"""SimCLR: NT-Xent against a loop transcription of l(i, j) over all 2B anchors, the head, h as the representation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from instdisc_lite import load_config
from instdisc_lite.infonce import info_nce, info_nce_logits
from instdisc_lite.methods import METHODS, build_method
from instdisc_lite.methods.simclr import SimCLR, nt_xent, nt_xent_logits
from instdisc_lite.models import ARCHITECTURES, build_backbone, build_encoder


def loop_nt_xent(u1: torch.Tensor, u2: torch.Tensor, tau: float) -> float:
    """The paper's l(i, j) written out for the 2B views of raw (un-normalised) projections, sim = cosine."""
    z = torch.cat([u1, u2]).double().tolist()
    n, b = len(z), u1.shape[0]

    def sim(u, v):
        dot = sum(a * c for a, c in zip(u, v, strict=True))
        return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(c * c for c in v)))

    total = 0.0
    for i in range(n):
        j = (i + b) % n  # the other view of the same image
        denominator = sum(math.exp(sim(z[i], z[k]) / tau) for k in range(n) if k != i)
        total += -math.log(math.exp(sim(z[i], z[j]) / tau) / denominator)
    return total / n  # both orders of every pair: all 2B anchors


def raw(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize(("b", "d", "tau"), [(1, 3, 0.5), (2, 3, 0.5), (5, 4, 0.1), (8, 16, 1.0)])
def test_nt_xent_equals_loop_over_all_anchors(b, d, tau):
    u1, u2 = raw(b, d, seed=1) * 3, raw(b, d, seed=2)  # unequal scales: only the cosine may matter
    value = nt_xent(F.normalize(u1, dim=1), F.normalize(u2, dim=1), tau).item()
    assert value == pytest.approx(loop_nt_xent(u1, u2, tau), rel=1e-6)


def test_logits_are_info_nce_with_positive_first_and_the_other_views_as_per_query_negatives():
    b, d, tau = 4, 6, 0.3
    z1, z2 = F.normalize(raw(b, d, seed=3), dim=1), F.normalize(raw(b, d, seed=4), dim=1)
    z = torch.cat([z1, z2])
    partner = torch.cat([torch.arange(b, 2 * b), torch.arange(b)])
    negatives = torch.stack([z[[k for k in range(2 * b) if k not in (i, int(partner[i]))]] for i in range(2 * b)])
    expected = info_nce_logits(z, z[partner], negatives, tau)  # (2B, 1 + 2B - 2) from (2B, 2B - 2, d) negatives
    logits = nt_xent_logits(z1, z2, tau)
    assert logits.shape == (2 * b, 2 * b - 1)
    assert torch.allclose(logits, expected, atol=1e-12)
    assert nt_xent(z1, z2, tau).item() == pytest.approx(info_nce(expected).item())


def test_nt_xent_is_symmetric_in_the_views_and_rewards_aligned_pairs():
    z1, z2 = F.normalize(raw(6, 5, seed=5), dim=1), F.normalize(raw(6, 5, seed=6), dim=1)
    assert nt_xent(z1, z2, 0.5).item() == pytest.approx(nt_xent(z2, z1, 0.5).item())
    assert nt_xent(z1, z1, 0.1) < nt_xent(z1, z2, 0.1)


def method(arch: str = "small_cnn", in_channels: int = 3, **overrides) -> SimCLR:
    config = load_config("simclr_cifar10", {"arch": arch, **overrides})
    return build_method(config, num_items=10, in_channels=in_channels)


def test_registered_with_two_views_no_bank_and_the_papers_cifar_temperature():
    assert METHODS["simclr"] is SimCLR
    m = method()
    assert m.num_views == 2 and m.bank is None and m.temperature == 0.5
    assert not any("bank" in k for k in m.state_dict())


def test_head_is_a_two_layer_mlp_from_h_to_low_dim():
    m = method()  # small_cnn: h is 256-d
    linears = [layer for layer in m.head if isinstance(layer, torch.nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(256, 256), (256, 128)]
    assert isinstance(m.head[1], torch.nn.ReLU)
    narrow = method(head_hidden_dim=64, low_dim=32)
    assert [(lin.in_features, lin.out_features) for lin in narrow.head if isinstance(lin, torch.nn.Linear)] == [
        (256, 64), (64, 32)
    ]  # fmt: skip


def test_forward_is_nt_xent_of_the_projected_views_and_gradients_reach_encoder_and_head(seeded):
    m = method()
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    loss = m(views, torch.arange(4))
    loss.backward()
    for part in (m.encoder, m.head):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(g.abs().sum().item() for g in grads) > 0
    m.after_step()  # nothing outside the gradient
    m.eval()  # BN on running stats: the views can be projected one at a time for the reference
    with torch.no_grad():
        z1, z2 = m.project(views[0]), m.project(views[1])
        assert torch.allclose(z1.norm(dim=1), torch.ones(4), atol=1e-5)
        assert m(views, torch.arange(4)).item() == pytest.approx(nt_xent(z1, z2, m.temperature).item(), rel=1e-5)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_encoder_outputs_h_of_the_backbone_width_for_every_architecture(arch):
    m = method(arch, in_channels=1).eval()
    width = {"small_cnn": 256, "small_cnn_fast": 256, "resnet18_cifar": 512, "resnet18": 512, "resnet50": 2048}[arch]
    assert m.feature_dim == width != m.config.low_dim
    with torch.no_grad():
        h = m.encoder(torch.randn(2, 1, 32, 32))
        assert h.shape == (2, width)  # the representation before the head, not the 128-d z
        assert m.project(torch.randn(2, 1, 32, 32)).shape == (2, 128)


def test_backbone_is_the_encoder_without_its_final_linear():
    torch.manual_seed(0)
    encoder = build_encoder("small_cnn", low_dim=16, in_channels=1).eval()
    backbone, dim = build_backbone("small_cnn", in_channels=1)
    missing = backbone.load_state_dict(encoder.backbone.state_dict(), strict=False)
    assert dim == 256 and missing.missing_keys == [] and set(missing.unexpected_keys) == {"6.weight", "6.bias"}
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        h = backbone.eval()(x)
        fc = encoder.backbone[-1]
        assert torch.allclose(F.normalize(fc(h), dim=1), encoder(x), atol=1e-6)
