"""InvaSpread: the loss against a loop transcription of the paper's J, stability, gradients, the method's wiring."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from instdisc_lite import load_config
from instdisc_lite.methods import METHODS, build_method
from instdisc_lite.methods.invaspread import InvaSpread, invaspread_loss, log1mexp
from instdisc_lite.methods.simclr import nt_xent
from instdisc_lite.models import ARCHITECTURES


def loop_j(f: torch.Tensor, f_hat: torch.Tensor, tau: float) -> float:
    """J / B written term by term: P(i | x̂_i), P(i | x_j) with k over the B view-0 features."""
    b = f.shape[0]
    f, f_hat = f.double().tolist(), f_hat.double().tolist()

    def dot(u, v):
        return sum(a * c for a, c in zip(u, v, strict=True))

    j_total = 0.0
    for i in range(b):
        p_pos = math.exp(dot(f[i], f_hat[i]) / tau) / sum(math.exp(dot(f[k], f_hat[i]) / tau) for k in range(b))
        j_total -= math.log(p_pos)
        for j in range(b):
            if j != i:
                p_ij = math.exp(dot(f[i], f[j]) / tau) / sum(math.exp(dot(f[k], f[j]) / tau) for k in range(b))
                j_total -= math.log(1.0 - p_ij)
    return j_total / b


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=1)


@pytest.mark.parametrize(("b", "d", "tau"), [(2, 3, 0.5), (5, 4, 0.1), (7, 8, 0.07)])
def test_loss_equals_loop_transcription_of_j(b, d, tau):
    f, f_hat = unit(b, d, seed=1), unit(b, d, seed=2)
    assert invaspread_loss(f, f_hat, tau).item() == pytest.approx(loop_j(f, f_hat, tau), rel=1e-5)


def test_loss_is_not_symmetric_in_the_views_and_is_not_nt_xent():
    f, f_hat = unit(6, 5, seed=3), unit(6, 5, seed=4)
    j = invaspread_loss(f, f_hat, 0.1).item()
    assert j != pytest.approx(invaspread_loss(f_hat, f, 0.1).item(), rel=1e-3)  # view 0 holds the instance weights
    assert j != pytest.approx(nt_xent(f, f_hat, 0.1).item(), rel=1e-2)


def test_perfect_invariance_and_spread_lowers_the_loss():
    # orthogonal instances, copies equal to their images: the positives win and the P(i | x_j) are small
    f = torch.eye(4, 8, dtype=torch.float64)
    good = invaspread_loss(f, f.clone(), 0.1).item()
    shuffled = invaspread_loss(f, f.roll(1, dims=0), 0.1).item()  # every copy looks like another instance
    collapsed = invaspread_loss(unit(1, 8).expand(4, 8), unit(1, 8).expand(4, 8), 0.1).item()
    assert good < collapsed < shuffled
    assert collapsed == pytest.approx(math.log(4) + 3 * math.log(4 / 3))  # every P = 1/4


def test_log1mexp_is_accurate_where_the_naive_form_is_not():
    x = torch.tensor([-1e-9, -1e-4, -0.5, -math.log(2), -1.0, -20.0, -100.0], dtype=torch.float64)
    assert torch.allclose(log1mexp(x), torch.log(-torch.expm1(x)), rtol=1e-12)
    x32 = torch.tensor([-1e-9, -100.0])
    naive = torch.log(1 - torch.exp(x32))
    assert torch.isinf(naive[0]) and naive[1] == 0  # 1 - exp cancels to 0 near 0, loses exp(x) far from 0
    ours = log1mexp(x32)
    assert ours[0].item() == pytest.approx(math.log(1e-9), rel=1e-5)
    assert ours[1].item() == pytest.approx(-math.exp(-100.0), rel=1e-5)
    x32.requires_grad_(True)
    log1mexp(x32).sum().backward()
    assert torch.isfinite(x32.grad).all()


def test_loss_and_gradients_stay_finite_at_low_temperature():
    f = unit(16, 4, seed=5).float().requires_grad_(True)
    f_hat = unit(16, 4, seed=6).float().requires_grad_(True)
    loss = invaspread_loss(f, f_hat, 0.005)  # logits up to 200: exp would overflow float32
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(f.grad).all() and torch.isfinite(f_hat.grad).all()


def method(arch: str = "small_cnn", in_channels: int = 3, **overrides) -> InvaSpread:
    config = load_config("invaspread_cifar10", {"arch": arch, **overrides})
    return build_method(config, num_items=10, in_channels=in_channels)


def test_registered_with_two_views_and_no_bank():
    assert METHODS["invaspread"] is InvaSpread
    m = method()
    assert isinstance(m, InvaSpread) and m.num_views == 2 and m.bank is None
    assert m.temperature == 0.1  # the paper's CIFAR tau, from the config
    assert not any("bank" in k for k in m.state_dict())


def test_forward_is_the_loss_of_the_two_encoded_views_and_gradients_reach_the_encoder(seeded):
    m = method()
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    loss = m(views, torch.arange(4))
    m.eval()  # in eval mode BN uses running stats: the views can be encoded one at a time for the reference
    with torch.no_grad():
        expected = invaspread_loss(m.encoder(views[0]), m.encoder(views[1]), m.temperature)
        assert m(views, torch.arange(4)).item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    grads = [p.grad for p in m.encoder.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0
    m.after_step()  # nothing outside the gradient: a no-op that must not fail


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_encoder_works_for_every_architecture(arch):
    m = method(arch, in_channels=1).eval()
    with torch.no_grad():
        out = m.encoder(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 128)
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)
