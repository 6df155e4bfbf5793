"""The objectives against naive, loop-by-loop implementations of the paper's equations."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from instdisc_lite import NCE, MemoryBank, NonParametricSoftmax, ParametricSoftmax, partition_function, proximal_term
from instdisc_lite import nce as nce_module


def make_bank(n: int, d: int, seed: int = 0, dtype=torch.float32) -> MemoryBank:
    return MemoryBank(n, d, momentum=0.5, generator=torch.Generator().manual_seed(seed)).to(dtype)


def features_near(bank: MemoryBank, indices: torch.Tensor, noise: float, seed: int, dtype=None) -> torch.Tensor:
    """Unit features close to their own bank rows (as after some training), so positives score high."""
    g = torch.Generator().manual_seed(seed)
    rows = bank.memory[indices]
    f = rows + noise * torch.randn(rows.shape, generator=g, dtype=rows.dtype)
    return F.normalize(f, dim=1).to(dtype or rows.dtype)


# ------------------------------------------------------------------------------------------------
# Non-parametric softmax (eq. 2) and its gradient
# ------------------------------------------------------------------------------------------------


def naive_softmax_loss_and_grad(features, memory, indices, tau):
    """-mean_b log P(i_b|f_b) and the analytic gradient (sum_j P(j|f_b) v_j - v_{i_b}) / (tau B), by loops."""
    batch = features.shape[0]
    loss = 0.0
    grad = torch.zeros_like(features)
    for b in range(batch):
        scores = [float(memory[j] @ features[b]) / tau for j in range(memory.shape[0])]
        top = max(scores)
        weights = [math.exp(s - top) for s in scores]
        total = sum(weights)
        probs = [w / total for w in weights]
        loss -= math.log(probs[int(indices[b])])
        expected_v = sum(p * memory[j] for j, p in enumerate(probs))
        grad[b] = (expected_v - memory[int(indices[b])]) / (tau * batch)
    return loss / batch, grad


def test_nonparametric_softmax_gradient_matches_analytic_form_float64():
    bank = make_bank(40, 8, seed=1, dtype=torch.float64)
    objective = NonParametricSoftmax(bank, temperature=0.07)
    indices = torch.tensor([3, 17, 0, 39, 17])
    features = features_near(bank, indices, noise=0.7, seed=2).requires_grad_()
    loss = objective.data_loss(features, indices)
    loss.backward()
    ref_loss, ref_grad = naive_softmax_loss_and_grad(features.detach(), bank.memory, indices, 0.07)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(ref_loss, rel=1e-12)
    torch.testing.assert_close(features.grad, ref_grad, rtol=1e-10, atol=1e-12)
    assert bank.memory.grad is None


def test_nonparametric_softmax_forward_float32_gradient():
    bank = make_bank(64, 16, seed=3)
    objective = NonParametricSoftmax(bank, temperature=0.1)
    indices = torch.tensor([5, 9, 63, 0])
    features = features_near(bank, indices, noise=1.0, seed=4).requires_grad_()
    objective(features, indices).backward()
    _, ref_grad = naive_softmax_loss_and_grad(features.detach().double(), bank.memory.double(), indices, 0.1)
    torch.testing.assert_close(features.grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


def test_parametric_softmax_is_cross_entropy_over_its_weights():
    torch.manual_seed(0)
    objective = ParametricSoftmax(dim=6, num_items=11)
    features = F.normalize(torch.randn(4, 6), dim=1)
    indices = torch.tensor([0, 10, 4, 4])
    weights = objective.classifier.weight.detach()
    ref = 0.0
    for b in range(4):
        logits = [float(weights[j] @ features[b]) for j in range(11)]
        ref -= logits[int(indices[b])] - math.log(sum(math.exp(s) for s in logits))
    assert objective(features, indices).item() == pytest.approx(ref / 4, rel=1e-5)


# ------------------------------------------------------------------------------------------------
# NCE (eqs. 4-7) term by term
# ------------------------------------------------------------------------------------------------


def naive_z(features, memory, noise, n):
    """Eq. 7 over a batch: n * mean over (b, k) of exp(v_{j_bk} . f_b / tau) (tau applied by the caller)."""
    vals = []
    for b in range(features.shape[0]):
        row = noise[b] if noise.dim() == 2 else noise
        vals += [math.exp(float(memory[int(j)] @ features[b])) for j in row]
    return n * sum(vals) / len(vals)


def naive_nce(features, memory, indices, noise, tau, z, m):
    """J = mean_b [ -log h(pos) - sum_k log(1 - h(noise_k)) ], P = exp(v.f/tau)/Z, h = P / (P + m/n)."""
    n = memory.shape[0]
    total = 0.0
    for b in range(features.shape[0]):
        f = features[b]
        p_pos = math.exp(float(memory[int(indices[b])] @ f) / tau) / z
        term = -math.log(p_pos / (p_pos + m / n))
        row = noise[b] if noise.dim() == 2 else noise
        for j in row:
            p = math.exp(float(memory[int(j)] @ f) / tau) / z
            term -= math.log(1.0 - p / (p + m / n))
        total += term
    return total / features.shape[0]


@pytest.mark.parametrize("shared", [False, True], ids=["per_image", "shared"])
@pytest.mark.parametrize("z_mode", ["fixed", "running"])
def test_nce_matches_paper_formula_term_by_term(shared, z_mode):
    n, d, m, tau, batch = 200, 16, 24, 0.07, 5
    bank = make_bank(n, d, seed=5)
    nce = NCE(bank, num_negatives=m, temperature=tau, z_mode=z_mode, z_momentum=0.9, shared_negatives=shared)
    g = torch.Generator().manual_seed(6)
    memory = bank.memory.double()

    def batch_and_noise(seed):
        idx = torch.randint(n, (batch,), generator=g)
        feats = features_near(bank, idx, noise=0.6, seed=seed)
        noise = torch.randint(n, (m,) if shared else (batch, m), generator=g)
        return idx, feats, noise

    # first batch: Z is estimated from it, in both modes
    idx1, f1, noise1 = batch_and_noise(7)
    assert nce.z.item() < 0  # not estimated yet
    loss1 = nce(f1, idx1, noise_indices=noise1)
    z1 = naive_z(f1.double() / tau, memory, noise1, n)
    assert nce.z.item() == pytest.approx(z1, rel=1e-5)
    assert loss1.item() == pytest.approx(naive_nce(f1.double(), memory, idx1, noise1, tau, z1, m), rel=1e-5)

    # second batch: fixed keeps Z, running moves it by the EMA before using it
    idx2, f2, noise2 = batch_and_noise(8)
    z_before = nce.z.item()
    loss2 = nce(f2, idx2, noise_indices=noise2)
    z_batch2 = naive_z(f2.double() / tau, memory, noise2, n)
    assert z_batch2 != pytest.approx(z1, rel=1e-3)  # the two batches really disagree, so the check below can fail
    if z_mode == "fixed":
        assert nce.z.item() == z_before
        z2 = z1
    else:
        z2 = 0.9 * z1 + 0.1 * z_batch2
        assert nce.z.item() == pytest.approx(z2, rel=1e-5)
    assert loss2.item() == pytest.approx(naive_nce(f2.double(), memory, idx2, noise2, tau, z2, m), rel=1e-5)

    # evaluation mode never moves Z
    nce.eval()
    z_eval = nce.z.item()
    nce(f1, idx1, noise_indices=noise1)
    assert nce.z.item() == z_eval


def test_nce_sample_noise_shapes_and_range():
    bank = make_bank(50, 4)
    per_image = NCE(bank, num_negatives=300, shared_negatives=False).sample_noise(7)
    shared = NCE(bank, num_negatives=300, shared_negatives=True).sample_noise(7)
    assert per_image.shape == (7, 300) and shared.shape == (300,)
    for noise in (per_image, shared):
        assert noise.dtype == torch.long and noise.min() >= 0 and noise.max() < 50
        assert len(torch.unique(noise)) > 40  # uniform over all rows, not a fixed subset


@pytest.mark.parametrize("shared", [False, True], ids=["per_image", "shared"])
def test_nce_gradient_does_not_flow_through_z_or_bank(shared):
    bank = make_bank(100, 8, seed=9)
    nce = NCE(bank, num_negatives=16, temperature=0.1, shared_negatives=shared)
    idx = torch.tensor([1, 2, 3])
    f = features_near(bank, idx, 0.5, seed=10).requires_grad_()
    noise = torch.randint(100, (16,) if shared else (3, 16), generator=torch.Generator().manual_seed(0))
    loss = nce(f, idx, noise_indices=noise)
    loss.backward()
    # reference gradient with Z as a constant: differentiate the naive formula in float64 by autograd
    z = nce.z.item()
    fd = f.detach().double().requires_grad_()
    memory = bank.memory.double()
    p_pos = torch.exp((fd * memory[idx]).sum(1) / 0.1) / z
    rows = memory[noise].expand(3, 16, 8) if shared else memory[noise]  # (B, m, d)
    p_noise = torch.exp(torch.einsum("bkd,bd->bk", rows, fd) / 0.1) / z
    k = 16 / 100
    ref = (-torch.log(p_pos / (p_pos + k)) - torch.log(1 - p_noise / (p_noise + k)).sum(1)).mean()
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(f.grad.double(), fd.grad, rtol=1e-4, atol=1e-6)
    assert not bank.memory.requires_grad
    with torch.no_grad():  # the shared term skips its gradient here, not its value
        assert nce(f, idx, noise_indices=noise).item() == pytest.approx(loss.item(), rel=1e-6)


def test_shared_noise_gradient_is_that_of_the_computed_loss_even_if_the_bank_moves_before_the_backward():
    """The shared term takes its gradient in the forward, from copies of the rows: a bank write between the
    forward and the backward (the wrong order, but a possible one) changes nothing."""
    bank = make_bank(120, 8, seed=11)
    idx, noise = torch.tensor([4, 5]), torch.arange(20, 44)
    f = features_near(bank, idx, 0.5, seed=12)
    grads = []
    for write_first in (False, True):
        b = make_bank(120, 8, seed=11)
        nce = NCE(b, num_negatives=24, temperature=0.1, shared_negatives=True)
        x = f.clone().requires_grad_()
        loss = nce(x, idx, noise_indices=noise)
        if write_first:
            b.update(torch.arange(0, 60), torch.randn(60, 8))
        loss.backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])


# ------------------------------------------------------------------------------------------------
# NCE against the official code (benchmarks/objectives.py's re-implementation); how it scores its noise
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def official():
    """``benchmarks/objectives.py`` as a module (its :class:`OfficialNCE` is the reference the benchmark times)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "objectives.py"
    spec = importlib.util.spec_from_file_location("benchmark_objectives", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("scoring", ["dense", "gather"])
def test_nce_gives_the_official_loss_and_gradient_on_the_same_indices(official, scoring):
    n, d, m, tau, batch = 3000, 32, 256, 0.07, 16
    bank = make_bank(n, d, seed=30)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(31))[:batch]
    feats = features_near(bank, idx, noise=0.5, seed=32)
    reference = official.OfficialNCE(bank, m, tau, eps=0.0)
    torch.manual_seed(33)
    draw = reference.sample(idx)  # (B, m + 1) alias draws, the positive in slot 0
    assert draw.shape == (batch, m + 1) and torch.equal(draw[:, 0], idx) and 0 <= draw.min() and draw.max() < n
    f_ref = feats.clone().requires_grad_()
    loss_ref = reference(f_ref, idx, draw)
    loss_ref.backward()
    # the official Z: n x the mean of exp(score / tau) over all m + 1 columns of the first batch, the positive too
    scores = torch.einsum("bkd,bd->bk", bank.memory.double()[draw], feats.double()) / tau
    assert reference.z == pytest.approx(n * scores.exp().mean().item(), rel=1e-5)

    ours = NCE(bank, num_negatives=m, temperature=tau, z_mode="fixed", scoring=scoring)
    ours.z.fill_(reference.z)  # the same Z (ours would estimate it from the noise columns only)
    f = feats.clone().requires_grad_()
    loss = ours(f, idx, noise_indices=draw[:, 1:])
    loss.backward()
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-5)
    assert relative_difference(f.grad, f_ref.grad) < 1e-5
    assert ours.z.item() == reference.z  # fixed: the loss did not move it


def test_official_eps_moves_the_loss_by_more_than_1e_5_at_the_papers_m_over_n(official):
    """The official criterion adds eps = 1e-7 to both denominators of eq. 5; each of the m + 1 terms of an image then
    moves by about eps / (P + m P_n), which at m/n = 4096/50000 is ~5e-4 of the loss: hence the comparison above is
    against eps = 0 (eq. 6 exactly), and the official loss is that plus this first-order shift."""
    n, d, m, tau, batch = 50_000, 16, 4096, 0.07, 4
    bank = make_bank(n, d, seed=34, dtype=torch.float64)
    idx = torch.tensor([3, 1000, 25_000, 49_999])
    feats = features_near(bank, idx, noise=0.5, seed=35)
    torch.manual_seed(36)
    draw = official.OfficialNCE(bank, m, tau).sample(idx)
    losses, outputs = {}, {}
    for eps in (official.OFFICIAL_EPS, 0.0):
        reference = official.OfficialNCE(bank, m, tau, eps=eps)
        outputs[eps] = reference.layer(feats, idx, draw)
        losses[eps] = reference.criterion(outputs[eps]).item()
    shift = official.OFFICIAL_EPS * (1.0 / (outputs[0.0] + m / n)).sum().item() / batch
    assert losses[official.OFFICIAL_EPS] - losses[0.0] == pytest.approx(shift, rel=1e-3)
    assert shift / losses[0.0] > 1e-5


def test_dense_and_gathered_scores_are_the_same_loss_and_gradient():
    n, d, m, tau, batch = 500, 16, 40, 0.1, 6
    bank = make_bank(n, d, seed=37)
    idx = torch.tensor([0, 7, 99, 250, 499, 7])
    noise = torch.randint(n, (batch, m), generator=torch.Generator().manual_seed(38))
    grads, losses = {}, {}
    for scoring in ("dense", "gather"):
        nce = NCE(bank, num_negatives=m, temperature=tau, z_mode="running", scoring=scoring)
        f = features_near(bank, idx, noise=0.4, seed=39).requires_grad_()
        loss = nce(f, idx, noise_indices=noise)
        loss.backward()
        losses[scoring], grads[scoring] = loss.item(), f.grad
    assert losses["dense"] == pytest.approx(losses["gather"], rel=1e-6)
    assert relative_difference(grads["dense"], grads["gather"]) < 1e-6
    # auto: dense while n <= DENSE_SCORES_MAX_RATIO x m (both cost ~B x rows scored; measured crossover)
    ratio = nce_module.DENSE_SCORES_MAX_RATIO
    assert NCE(make_bank(ratio * 10, 4), num_negatives=10).dense_scoring()
    assert not NCE(make_bank(ratio * 10 + 1, 4), num_negatives=10).dense_scoring()
    with pytest.raises(ValueError, match="scoring"):
        NCE(bank, scoring="sparse")


@pytest.mark.parametrize("embedding_bag", [True, False], ids=["embedding_bag", "scatter_matmul"])
def test_weighted_row_sums_of_the_dense_backward(monkeypatch, embedding_bag):
    if not embedding_bag:  # the path of devices without embedding_bag (Apple MPS), taken on the CPU
        monkeypatch.setattr(nce_module, "EMBEDDING_BAG_DEVICES", ())
    g = torch.Generator().manual_seed(44)
    memory, rows = torch.randn(50, 6, generator=g), torch.randint(50, (4, 9), generator=g)
    rows[0, :3] = 7  # repeats within a row are summed
    weights = torch.randn(4, 9, generator=g)
    expected = torch.einsum("bk,bkd->bd", weights, memory[rows])
    torch.testing.assert_close(nce_module.weighted_row_sums(memory, rows, weights), expected)


def test_dense_scoring_never_writes_the_bank_and_refuses_a_bank_written_before_the_backward():
    bank = make_bank(300, 8, seed=40)
    before = bank.memory.clone()
    nce = NCE(bank, num_negatives=30, temperature=0.1, scoring="dense")
    idx = torch.tensor([1, 2, 3])
    f = features_near(bank, idx, noise=0.5, seed=41).requires_grad_()
    nce(f, idx).backward()
    assert torch.equal(bank.memory, before) and bank.memory.grad is None and not bank.memory.requires_grad
    loss = nce(f, idx)
    bank.update(idx, f.detach())  # too early: the backward would read rows that changed since the forward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_softplus_sum_is_exact_to_float_precision_with_torchs_gradient():
    """The CPU path (:class:`_SoftplusSum`, no log1p) against exact values; softplus_sum takes it for large tensors."""
    x = torch.cat([torch.linspace(-30, 30, 241), torch.tensor([-100.0, -87.0, 0.0, 1e-6, 40.0, 89.0, 1e4])])
    xd = x.double()
    exact = xd.clamp(min=0) + torch.log1p(torch.exp(-xd.abs()))  # F.softplus returns x itself above x = 20
    fast = nce_module._SoftplusSum.apply
    for dtype, rel in ((torch.float32, 3e-7), (torch.float64, 1e-15)):
        tiny = torch.finfo(dtype).tiny  # sigmoid(-100) is a float32 denormal
        for i in range(len(x)):  # term by term: the sum of one element is that element's softplus
            if exact[i] > tiny:
                value = fast(x[i : i + 1].to(dtype)).double()
                assert abs(value - exact[i]) <= rel * exact[i], (x[i], value, exact[i])
        xs = x.to(dtype, copy=True).requires_grad_()
        total = fast(xs)
        assert total.dim() == 0 and total.item() == pytest.approx(exact.sum().item(), rel=rel)
        (2 * total).backward()
        torch.testing.assert_close(xs.grad.double(), 2 * torch.sigmoid(xd), rtol=rel, atol=tiny)
    big = torch.randn(64, 1024, dtype=torch.float64) * 5  # large enough for the fast path
    assert nce_module.softplus_sum(big).item() == pytest.approx(F.softplus(big).sum().item(), rel=1e-12)


def test_z_is_read_on_the_host_once_not_every_step(monkeypatch):
    bank = make_bank(400, 8, seed=42)
    idx = torch.tensor([5, 6, 7])
    f = features_near(bank, idx, noise=0.5, seed=43)
    reads = []
    item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append(1) or item(t))
    for z_mode in ("fixed", "running"):
        nce = NCE(bank, num_negatives=20, z_mode=z_mode)
        reads.clear()
        for _ in range(5):
            nce(f, idx)
        assert len(reads) == 1  # the first step: "is Z estimated yet?"
        # anything that writes Z from outside (a checkpoint, a reset) is seen: Z is read again, once
        nce.load_state_dict({**nce.state_dict(), "z": torch.tensor(-1.0, dtype=torch.float64)})
        reads.clear()
        nce(f, idx)
        nce(f, idx)
        assert len(reads) == 1 and item(nce.z) > 0  # re-estimated from the batch
        nce.z.fill_(-1.0)
        nce(f, idx)
        assert item(nce.z) > 0


# ------------------------------------------------------------------------------------------------
# Z's dtype: float64 where the device has it, float32 on Apple MPS
# ------------------------------------------------------------------------------------------------


def test_z_dtype_is_float64_except_on_mps():
    for device in ("cpu", "cuda", torch.device("cuda", 1), "meta", torch.device("cpu")):
        assert nce_module.z_dtype(device) == torch.float64, device
    for device in ("mps", torch.device("mps"), "mps:0"):
        assert nce_module.z_dtype(device) == torch.float32, device


def test_moving_or_casting_nce_keeps_z():
    nce = NCE(make_bank(30, 4), num_negatives=5)
    value = 1234.5678901234567  # needs float64: float32 or float16 would round it
    nce.z.fill_(value)
    assert nce.z.dtype == torch.float64 and "z" in nce.state_dict()
    for move, bank_dtype in ((NCE.half, torch.float16), (NCE.float, torch.float32), (NCE.double, torch.float64),
                             (lambda m: m.to(torch.bfloat16), torch.bfloat16), (lambda m: m.to("cpu"), torch.bfloat16),
                             (lambda m: m.to("cpu", torch.float32), torch.float32)):  # fmt: skip
        assert move(nce) is nce
        assert nce.bank.memory.dtype == bank_dtype  # the cast reached everything else
        assert nce.z.dtype == torch.float64 and nce.z.item() == value
        assert torch.equal(nce.state_dict()["z"], torch.tensor(value, dtype=torch.float64))
    assert nce.to("meta").z.device.type == "meta" and nce.z.dtype == torch.float64


def test_nce_z_on_a_device_without_float64(monkeypatch):
    """What MPS does, on CPU: a device whose ``.to`` rejects float64 and whose Z is float32."""
    bank = make_bank(60, 8, seed=22)
    idx = torch.tensor([0, 9, 33])
    f = features_near(bank, idx, noise=0.5, seed=23)
    noise = torch.randint(60, (3, 7), generator=torch.Generator().manual_seed(24))
    wide = NCE(bank, num_negatives=7, temperature=0.1)
    loss_wide = wide(f, idx, noise_indices=noise)
    z_wide = wide.z.item()

    monkeypatch.setattr(nce_module, "z_dtype", lambda device: torch.float32)

    def to_fake_mps(t: torch.Tensor) -> torch.Tensor:
        if t.dtype == torch.float64:
            raise TypeError("Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't support float64")
        return t.clone()

    moved = NCE(bank, num_negatives=7, temperature=0.1)
    moved.load_state_dict(wide.state_dict())  # a float64 Z from a CPU/CUDA checkpoint
    assert moved.z.dtype == torch.float32 and moved.z.item() == pytest.approx(z_wide, rel=1e-7)
    narrow = NCE(bank, num_negatives=7, temperature=0.1)
    narrow.z = narrow.z.double()  # as saved on CPU; moving it must not hand the float64 Z to the device
    narrow.z.fill_(-1.0)
    narrow._apply(to_fake_mps)
    assert narrow.z.dtype == torch.float32
    loss_narrow = narrow(f, idx, noise_indices=noise)  # estimate_z in float32 too
    assert narrow.z.dtype == torch.float32 and narrow.z.item() == pytest.approx(z_wide, rel=1e-6)
    assert loss_narrow.item() == pytest.approx(loss_wide.item(), rel=1e-6)

    monkeypatch.undo()
    back = NCE(bank, num_negatives=7, temperature=0.1)
    back.load_state_dict(narrow.state_dict())  # and a float32 Z saved on MPS loads into float64
    assert back.z.dtype == torch.float64 and back.z.item() == pytest.approx(z_wide, rel=1e-6)


# ------------------------------------------------------------------------------------------------
# Z: the Monte-Carlo estimate approaches the exact partition function
# ------------------------------------------------------------------------------------------------


def test_partition_function_is_exact_sum():
    bank = make_bank(300, 12, seed=11)
    f = F.normalize(torch.randn(4, 12, generator=torch.Generator().manual_seed(12)), dim=1)
    z = partition_function(f, bank, 0.07)
    for b in range(4):
        ref = sum(math.exp(float(bank.memory[j].double() @ f[b].double()) / 0.07) for j in range(300))
        assert z[b].item() == pytest.approx(ref, rel=1e-5)


def test_z_estimate_approaches_exact_partition_function_as_m_grows():
    n, d, tau, batch = 20_000, 128, 0.07, 8
    bank = make_bank(n, d, seed=13)
    f = F.normalize(torch.randn(batch, d, generator=torch.Generator().manual_seed(14)), dim=1)
    exact = partition_function(f, bank, tau).double()  # (B,)
    errors: dict[int, list[float]] = {16: [], 4096: []}
    batch_errors: dict[int, list[float]] = {16: [], 4096: []}
    for m in errors:
        nce = NCE(bank, num_negatives=m, temperature=tau)
        for seed in range(10):
            noise = nce.sample_noise(batch, generator=torch.Generator().manual_seed(seed))
            scores = nce.noise_scores(f, noise)  # (B, m)
            per_image = n * scores.double().exp().mean(dim=1)  # (n/m) sum_k exp(...)
            errors[m].append(((per_image - exact).abs() / exact).mean().item())
            z_batch = nce.estimate_z(scores).item()  # the scalar the objective uses
            batch_errors[m].append(abs(z_batch - exact.mean().item()) / exact.mean().item())
    small, large = (sum(errors[m]) / len(errors[m]) for m in (16, 4096))
    assert large < small / 4
    assert large < 0.1
    small_b, large_b = (sum(batch_errors[m]) / len(batch_errors[m]) for m in (16, 4096))
    assert large_b < small_b / 4
    assert large_b < 0.05


# ------------------------------------------------------------------------------------------------
# Shared and per-image negatives: the same expected loss
# ------------------------------------------------------------------------------------------------


def test_shared_and_per_image_negatives_have_same_expected_loss():
    n, d, m, tau, batch, draws = 300, 16, 8, 0.1, 6, 2000
    bank = make_bank(n, d, seed=15)
    idx = torch.tensor([0, 5, 10, 150, 299, 42])
    f = features_near(bank, idx, noise=0.5, seed=16)
    z = partition_function(f, bank, tau).mean().item()
    losses = {}
    g = torch.Generator().manual_seed(17)
    for shared in (False, True):
        nce = NCE(bank, num_negatives=m, temperature=tau, z_mode="fixed", shared_negatives=shared)
        nce.z.fill_(z)
        with torch.no_grad():
            losses[shared] = torch.tensor(
                [nce(f, idx, noise_indices=nce.sample_noise(batch, generator=g)).item() for _ in range(draws)],
                dtype=torch.float64,
            )
    # the exact expectation: each noise slot is uniform over all n rows
    memory, fd = bank.memory.double(), f.double()
    p = torch.exp(fd @ memory.T / tau) / z  # (B, n)
    k = m / n
    log_h_pos = torch.log(p[torch.arange(batch), idx] / (p[torch.arange(batch), idx] + k))
    log_1m_h = torch.log(1 - p / (p + k))  # (B, n)
    expected = (-log_h_pos - m * log_1m_h.mean(dim=1)).mean().item()

    means = {s: v.mean().item() for s, v in losses.items()}
    ses = {s: v.std().item() / math.sqrt(draws) for s, v in losses.items()}
    assert all(se > 0 for se in ses.values())
    for s in (False, True):
        assert abs(means[s] - expected) < 4 * ses[s], (s, means[s], expected, ses[s])
    assert abs(means[True] - means[False]) < 4 * math.hypot(ses[True], ses[False])


# ------------------------------------------------------------------------------------------------
# Proximal regularisation (eq. 8)
# ------------------------------------------------------------------------------------------------


def naive_proximal(features, rows, lam):
    total = 0.0
    for b in range(features.shape[0]):
        total += sum((float(features[b, j]) - float(rows[b, j])) ** 2 for j in range(features.shape[1]))
    return lam * total / features.shape[0]


@pytest.mark.parametrize("kind", ["nce", "softmax"])
def test_proximal_term_is_added_to_the_loss(kind):
    n, d, lam = 80, 8, 0.3
    bank = make_bank(n, d, seed=18)
    idx = torch.tensor([1, 7, 30, 79])
    f = features_near(bank, idx, noise=0.8, seed=19)
    noise = torch.randint(n, (4, 10), generator=torch.Generator().manual_seed(20))

    def build(weight):
        if kind == "nce":
            return NCE(bank, num_negatives=10, temperature=0.07, proximal=weight)
        return NonParametricSoftmax(bank, temperature=0.07, proximal=weight)

    kwargs = {"noise_indices": noise} if kind == "nce" else {}
    with_prox, plain = build(lam), build(0.0)
    loss_prox = with_prox(f, idx, **kwargs)
    loss_plain = plain(f, idx, **kwargs)
    expected_extra = naive_proximal(f, bank.memory[idx], lam)
    assert expected_extra > 0.01  # the features really are away from their rows
    assert (loss_prox - loss_plain).item() == pytest.approx(expected_extra, rel=1e-4)
    # lambda = 0 is exactly the data term
    assert torch.equal(plain(f, idx, **kwargs), plain.data_loss(f, idx, **kwargs))


def test_proximal_term_value_and_gradient():
    g = torch.Generator().manual_seed(21)
    f = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    rows = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    value = proximal_term(f, rows, 0.7)
    assert value.item() == pytest.approx(naive_proximal(f.detach(), rows.detach(), 0.7), rel=1e-12)
    value.backward()
    torch.testing.assert_close(f.grad, 2 * 0.7 * (f - rows).detach() / 5)
    assert rows.grad is None  # v^(t-1) is a constant
    assert proximal_term(f, rows, 0.0).item() == 0.0


def test_loss_oscillation_measures_wiggle_around_the_trend_not_the_trend():
    from instdisc_lite.proximal import loss_oscillation

    t = torch.arange(400, dtype=torch.float64)
    falling = 10 * torch.exp(-t / 150) + 1  # smooth decay: no oscillation
    wiggle = falling * (1 + 0.1 * torch.sin(t * 2 * math.pi / 7))  # +-10 % around it, period 7 steps
    assert loss_oscillation(falling.tolist(), window=28) < 0.005  # only the curvature of the decay
    assert 0.05 < loss_oscillation(wiggle.tolist(), window=28) < 0.08  # mean |sin| = 2/pi -> ~0.064
    assert loss_oscillation((2 * wiggle).tolist(), window=28) == pytest.approx(loss_oscillation(wiggle.tolist(), 28))
    with pytest.raises(ValueError, match="at least"):
        loss_oscillation([1.0] * 10, window=8)
