"""Chapter 3 — noise-contrastive estimation (paper Sec. 3.2, eqs. 3-7).

The exact softmax needs ``Z_i = sum_j exp(v_j^T f_i / tau)`` over all n rows. NCE turns the problem into
"is this pair data or noise?" with uniform noise ``P_n = 1/n`` drawn m times as often as data:

* ``P(i | v) = exp(v^T f_i / tau) / Z``                              (eq. 4)
* ``h(i, v) = P(i | v) / (P(i | v) + m P_n(i))``                    (eq. 5)
* ``J_NCE = -E_Pd[log h(i, v)] - m E_Pn[log(1 - h(i, v'))]``        (eq. 6)
* ``Z ~= n E_j[exp(v_j^T f_i / tau)] ~= (n / m) sum_k exp(v_{j_k}^T f_i / tau)``  (eq. 7)

With m samples the second expectation is estimated by their sum, so each image contributes
``-log h(pos) - sum_k log(1 - h(noise_k))``; the loss is the batch mean of that.

Z is a Monte-Carlo constant, not a function of the parameters: no gradient flows through it.
``z_mode="fixed"`` sets it from the first batch and keeps it (the paper and the official code);
``z_mode="running"`` keeps an exponential moving average instead, which follows the feature
distribution as it concentrates during training (see the chapter on why fixed Z can diverge).

Cost. The m noise scores of every image are read out of the bank in one of two ways, the same numbers either way:
*gather* copies the ``B x m`` noise rows (``B m d`` floats, 512 MiB at B = 256, m = 4096, d = 128) and takes one
dot product with each; *dense* computes all ``B x n`` scores ``F V^T`` with one matrix product and picks the
``B x m`` sampled ones out of it, and its backward sums the sampled rows weighted by their gradients
(``embedding_bag``) without copying them. Both cost in proportion to B, so the batch size cancels: dense wins while
n is at most about :data:`DENSE_SCORES_MAX_RATIO` times m (measured crossover, ``benchmarks/objectives.py``), e.g.
CIFAR-10 (n = 50,000, m = 4096); ImageNet (n = 1.28 M) gathers. Shared negatives need neither: one ``(m, d)``
gather and one ``B x m`` matrix product, and their term takes its gradient in the forward (:func:`shared_noise_term`),
so no ``B x m`` tensor is kept for the backward. On the CPU the ``B x m`` softplus terms are summed in place, without
a fresh ``B x m`` result (:func:`_softplus_sum_cpu`). Z stays on the device: the step never reads it on the host, so
a GPU step does not wait for the loss before queueing the next kernels.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import distributed
from .memory_bank import MemoryBank
from .proximal import BankObjective

Z_MODES = ("fixed", "running")
SCORINGS = ("auto", "dense", "gather")
# Per-image noise: score densely (all B x n, then pick) while n <= this x m, else gather the B x m rows. Both cost
# ~B x (rows scored): dense scores n rows per image at matrix-product speed, gather m rows at memory speed, so the
# crossover is a ratio m/n, whatever B. Measured on 2 AMD EPYC cores (fp32, d = 128, loss forward + backward,
# ``python benchmarks/objectives.py --parts crossover``, an earlier objectives_cpu.json): equal cost at m/n = 0.0105
# for n = 50,000, B = 256 (gather/dense 0.93 at m/n = 0.01, 2.9 at 0.02, 8.7 at CIFAR-10's 0.08); m/n = 0.008-0.01
# in a sweep at B = 64 and 256, n = 50,000 and 200,000, on one thread. On 2 Intel Xeon cores (the committed
# results/objectives_cpu.json): m/n = 0.0097, gather/dense 1.05 at 0.01, 5.2 at 0.08. Dense then also holds less
# memory than gather (B n floats against B m d, as long as d >= 100).
DENSE_SCORES_MAX_RATIO = 100


def z_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype of Z on ``device``: float64, except float32 on Apple MPS, which has no float64.

    Z sums n exponentials of scores up to 1/tau (eq. 7), so float64 is the safe default; float32's seven
    digits are still ample where float64 is missing, because the loss only uses log Z.
    """
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def _move_z(z: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``z`` on ``device`` as :func:`z_dtype` says, cast on whichever side supports both dtypes."""
    dtype = z_dtype(device)
    if dtype == torch.float32:  # narrow before the move: the target cannot hold float64
        return z.to(dtype).to(device)
    return z.to(device).to(dtype)  # widen after the move: the source may not hold float64


class _SampledScores(torch.autograd.Function):
    """``s[b, k] = f_b . v_{j_bk}`` for per-image noise indices ``j`` ``(B, m)``, read out of the dense ``F V^T``.

    Forward: one ``(B, d) x (d, n)`` matrix product, then a gather of the ``(B, m)`` sampled columns. Backward:
    ``ds / df_b = sum_k g_bk v_{j_bk}``, a weighted sum of bank rows (``embedding_bag``), so the ``(B, m, d)`` rows
    are never copied and nothing of size ``B x n`` is kept for the backward. The bank gets no gradient; it is saved
    for the backward, so writing it before the backward is an autograd error, not a silently wrong gradient.
    """

    @staticmethod
    def forward(ctx, features: torch.Tensor, memory: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(memory, noise)
        return torch.gather(features @ memory.T, 1, noise)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        memory, noise = ctx.saved_tensors
        return weighted_row_sums(memory, noise, grad.to(memory.dtype)).to(grad.dtype), None, None


EMBEDDING_BAG_DEVICES = ("cpu", "cuda")  # where torch implements embedding_bag


def weighted_row_sums(memory: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``out[b] = sum_k weights[b, k] * memory[rows[b, k]]``, ``(B, d)`` for ``rows`` and ``weights`` ``(B, m)``,
    without copying the ``(B, m, d)`` rows: ``embedding_bag`` where torch has it, else the transpose of
    :class:`_SampledScores`' forward (scatter the weights into ``(B, n)``, one matrix product)."""
    if weights.device.type in EMBEDDING_BAG_DEVICES:
        return F.embedding_bag(rows, memory, per_sample_weights=weights, mode="sum")
    dense = torch.zeros(weights.shape[0], memory.shape[0], dtype=memory.dtype, device=weights.device)
    return dense.scatter_add_(1, rows, weights) @ memory


def _softplus_sum_cpu(x: torch.Tensor, work: torch.Tensor, overwrite_x: bool = False) -> torch.Tensor:
    """``sum(softplus(x))``, ``softplus(x) = log(1 + exp(x))``, as a scalar, on the CPU: every pass over the
    ``B x m`` numbers in place, into ``work`` (same shape, overwritten) or, with ``overwrite_x``, into ``x``
    itself; no elementwise result and no ``log1p``.

    ``softplus(x) = max(x, 0) + log1p(e)`` with ``e = exp(-|x|)`` in (0, 1] (no overflow), and
    ``log1p(e) = log(u) + (e - (u - 1))`` for ``u = 1 + e`` rounded: the second term is what the rounding of
    ``1 + e`` lost, exact in floating point (``u - 1`` is exact), so tiny e keep their digits. It is summed as
    ``sum(e) - sum(u - 1)``: both sums are at most ``sum(log1p(e)) / log 2``, so their rounding stays within a few
    float32 epsilons of the result.

    Why not ``F.softplus(x).sum()``: it writes a fresh ``B x m`` result (page faults on every step), and its speed
    depends on the CPU: on a 256 x 4096 tensor it took several times as long as an earlier version of this on 2 AMD
    EPYC cores, and as long as this (0.89 ms both) on 2 AVX-512 Intel Xeon cores. ``benchmarks/objectives.py``
    times the NCE step that uses this.
    """
    total = torch.clamp(x, min=0, out=work).sum()  # sum of max(x, 0)
    # -|x| = x - 2 max(x, 0), exactly (doubling is exact): one pass instead of abs and neg
    e = (x.sub_(work, alpha=2) if overwrite_x else torch.sub(x, work, alpha=2, out=work)).exp_()
    total = total + e.sum()
    u = e.add_(1)
    total = total - u.sub_(1).sum()  # u - 1, exactly: sum(e) - sum(u - 1) is what rounding 1 + e lost
    return total + u.add_(1).log_().sum()


class _SoftplusSum(torch.autograd.Function):
    """``sum(softplus(x))`` for a large CPU tensor (:func:`_softplus_sum_cpu`), with torch's gradient ``sigmoid(x)``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return _softplus_sum_cpu(x, torch.empty_like(x))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return torch.sigmoid(x).mul_(grad)


def softplus_sum(x: torch.Tensor) -> torch.Tensor:
    """``sum(log(1 + exp(x)))`` over all elements, a scalar: :class:`_SoftplusSum` for large CPU tensors,
    ``F.softplus`` (one fused kernel) elsewhere and for small ones (B positives), where one op beats ten."""
    if x.device.type == "cpu" and x.numel() >= 2**15:
        return _SoftplusSum.apply(x)
    return F.softplus(x).sum()


def shared_noise_term(scaled: torch.Tensor, rows: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``sum_{b,k} softplus(x_bk)``, the noise half of eq. 6 for noise rows ``v`` ``(m, d)`` shared by the batch,
    given ``logits`` ``x = scaled v^T - log(Z m / n)`` ``(B, m)``, computed without autograd (and overwritten here).

    Its gradient with respect to ``scaled`` ``(B, d)`` is ``sum_k sigmoid(x_bk) v_k``: one ``(B, m) x (m, d)``
    product, taken here while the sigmoids are at hand, and attached to the value as
    ``((scaled - scaled.detach()) * grad).sum()``, a term that is exactly 0 and has exactly that gradient. So
    nothing of size ``B x m`` is kept for the backward, and a step writes two ``B x m`` tensors (the scores and one
    work buffer) instead of five. Z takes no gradient: it is a Monte-Carlo constant (module doc).
    """
    wants_grad = scaled.requires_grad and torch.is_grad_enabled()
    with torch.no_grad():
        grad = None
        if wants_grad:
            work = torch.sigmoid(logits)
            grad = work @ rows  # (B, d)
        else:
            work = torch.empty_like(logits)
        if logits.device.type == "cpu":
            total = _softplus_sum_cpu(logits, work, overwrite_x=True)
        else:
            total = F.softplus(logits).sum()
    if grad is None:
        return total
    return total + ((scaled - scaled.detach()) * grad).sum()


class NCE(BankObjective):
    """NCE objective over a memory bank with uniform noise.

    Args:
        bank: the memory bank (n rows of dimension d).
        num_negatives: m, noise samples per image (4096 in the paper).
        temperature: tau (0.07 in the paper).
        z_mode: ``"fixed"`` (estimate Z on the first batch, then keep it) or ``"running"``.
        z_momentum: for ``"running"``: ``Z <- mu Z + (1 - mu) Z_batch`` (0 re-estimates every batch).
        shared_negatives: draw one set of m noise indices for the whole batch (``(m,)``) instead of m
            per image (``(B, m)``, the paper). Same expected loss, a fraction of the memory traffic.
        proximal: lambda of the proximal term (0 = off, as in the official code).
        scoring: how per-image noise is scored (module doc): ``"dense"`` (``F V^T``, then pick), ``"gather"``
            (copy the ``B x m`` rows) or ``"auto"``: dense while ``n <= DENSE_SCORES_MAX_RATIO * m``. Same loss.

    ``forward(features (B, d), indices (B,), noise_indices=None) -> scalar``. ``noise_indices`` may be
    given explicitly, ``(B, m)`` or ``(m,)``, to fix the noise (tests, chapters).
    """

    def __init__(
        self,
        bank: MemoryBank,
        num_negatives: int = 4096,
        temperature: float = 0.07,
        z_mode: str = "fixed",
        z_momentum: float = 0.99,
        shared_negatives: bool = False,
        proximal: float = 0.0,
        scoring: str = "auto",
    ) -> None:
        super().__init__(bank, temperature, proximal)
        if num_negatives < 1:
            raise ValueError(f"NCE needs num_negatives >= 1, got {num_negatives}")
        if z_mode not in Z_MODES:
            raise ValueError(f"z_mode must be one of {Z_MODES}, got {z_mode!r}")
        if not 0.0 <= z_momentum < 1.0:
            raise ValueError(f"z_momentum must be in [0, 1), got {z_momentum}")
        if scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
        self.num_negatives = num_negatives
        self.z_mode = z_mode
        self.z_momentum = z_momentum
        self.shared_negatives = shared_negatives
        self.scoring = scoring
        # Z < 0 means "not estimated yet"; a buffer, so it is saved with the checkpoint. Its dtype
        # follows its device only (see _apply), never the dtype casts of the module.
        self.register_buffer("z", torch.tensor(-1.0, dtype=z_dtype(bank.memory.device)))
        self._z_seen: tuple[torch.Tensor, int] | None = None  # (Z, its version) when last known to be estimated

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> NCE:
        """``.to`` / ``.cuda`` / ``.half`` ... for everything but Z, which moves with its value kept.

        ``Module._apply`` would hand the float64 Z to ``fn``: ``.to("mps")`` fails on it and
        ``.half()`` / ``.to(torch.float32)`` would round it. Z goes to the device ``fn`` sends tensors
        to, in :func:`z_dtype` of that device.
        """
        z = self._buffers.pop("z")
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers["z"] = z
        target = fn(torch.empty(0, device=z.device)).device  # where fn sends tensors
        self._buffers["z"] = _move_z(z, target)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, *args, **kwargs) -> None:
        # A float64 Z saved on CPU/CUDA loads into a float32 Z on MPS: cast on the saved side first.
        key = prefix + "z"
        if key in state_dict and torch.is_tensor(state_dict[key]):
            state_dict[key] = _move_z(state_dict[key], self.z.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, *args, **kwargs)

    def sample_noise(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform noise indices: ``(m,)`` when negatives are shared, else ``(batch_size, m)``.

        Drawn with replacement from all n items; like the official code, a noise sample may
        happen to be the positive itself (probability m/n, harmless for large n).
        """
        shape = (self.num_negatives,) if self.shared_negatives else (batch_size, self.num_negatives)
        device = self.bank.memory.device
        if generator is not None and generator.device != device:
            return torch.randint(self.bank.num_items, shape, generator=generator).to(device)
        return torch.randint(self.bank.num_items, shape, generator=generator, device=device)

    def dense_scoring(self) -> bool:
        """Whether per-image noise is scored densely (``F V^T``, then pick) rather than by gathering rows."""
        if self.scoring != "auto":
            return self.scoring == "dense"
        return self.bank.num_items <= DENSE_SCORES_MAX_RATIO * self.num_negatives

    def _scores(self, scaled: torch.Tensor, noise_indices: torch.Tensor) -> torch.Tensor:
        """``v_{j_k}^T f_b / tau`` ``(B, m)`` for ``scaled = features / tau`` ``(B, d)`` (module doc: Cost)."""
        noise_indices = noise_indices.to(self.bank.memory.device)
        if noise_indices.dim() == 1:  # shared: one (m, d) gather, one matmul
            return scaled @ self.bank.get(noise_indices).T
        if self.dense_scoring():
            return _SampledScores.apply(scaled, self.bank.memory, noise_indices)
        noise = self.bank.get(noise_indices)  # (B, m, d)
        return torch.bmm(noise, scaled.unsqueeze(2)).squeeze(2)

    def noise_scores(self, features: torch.Tensor, noise_indices: torch.Tensor) -> torch.Tensor:
        """``v_{j_k}^T f_b / tau`` for every image b and noise sample k, shape ``(B, m)``."""
        return self._scores(features / self.temperature, noise_indices)

    @torch.no_grad()
    def estimate_z(self, noise_logits: torch.Tensor) -> torch.Tensor:
        """Eq. 7 for a batch: ``n * mean(exp(noise scores))``, a scalar in :func:`z_dtype`, averaged over ranks.

        ``noise_logits`` is ``(B, m)`` (the scores divided by tau). The exponentials are taken in the logits' own
        precision after subtracting their maximum (no overflow, no float64 copy of the ``B x m`` logits); the
        maximum is added back in :func:`z_dtype`.
        """
        dtype = z_dtype(noise_logits.device)
        top = noise_logits.max()
        total = (noise_logits - top).exp().sum().to(dtype)  # each term <= 1
        z_batch = total * top.to(dtype).exp() * (self.bank.num_items / noise_logits.numel())
        return distributed.all_reduce_mean(z_batch)

    def _z_is_estimated(self) -> bool:
        """Whether Z holds an estimate (is not the "not yet" -1). Z is read on the host only when it may have
        changed since this module last wrote or read it (a new module, ``load_state_dict``, a move, a write by
        other code: its version counter tells), so a training step does not wait for the device to read it."""
        seen = self._z_seen
        if seen is not None and seen[0] is self.z and seen[1] == self.z._version:
            return True
        return not self.z.item() < 0  # NaN counts as estimated, as before: the NaN guard reports it

    @torch.no_grad()
    def _current_z(self, noise_logits: torch.Tensor) -> torch.Tensor:
        if not self._z_is_estimated():  # first batch: both modes start from the batch estimate
            self.z.copy_(self.estimate_z(noise_logits))
        elif self.z_mode == "running" and self.training:
            z_batch = self.estimate_z(noise_logits)
            self.z.mul_(self.z_momentum).add_((1.0 - self.z_momentum) * z_batch)
        self._z_seen = (self.z, self.z._version)
        return self.z

    def data_loss(
        self, features: torch.Tensor, indices: torch.Tensor, noise_indices: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Eq. 6 with eqs. 4-5, averaged over the batch: ``mean_b [-log h(i_b, f_b) - sum_k log(1 - h(j_bk, f_b))]``
        for ``features`` ``(B, d)``, ``indices`` ``(B,)`` and noise ``(B, m)`` or ``(m,)`` (drawn if None); Z by eq. 7.
        """
        if noise_indices is None:
            noise_indices = self.sample_noise(features.shape[0])
        scaled = features / self.temperature  # (B, d): divide d numbers per image, not m + 1 scores
        pos_logits = (scaled * self.bank.get(indices)).sum(dim=1)  # (B,)
        noise_indices = noise_indices.to(self.bank.memory.device)
        shared = noise_indices.dim() == 1
        if shared:  # scores without autograd: shared_noise_term attaches their gradient itself
            rows = self.bank.get(noise_indices)  # (m, d)
            with torch.no_grad():
                noise_logits = scaled @ rows.T  # (B, m)
        else:
            noise_logits = self._scores(scaled, noise_indices)  # (B, m)
        log_z = self._current_z(noise_logits).log().to(features.dtype)  # on the device: no host read
        # log(m P_n) with P_n = 1/n, and log P = score - log Z. In log space, -log h = softplus(log(Z m P_n) - score)
        # and -log(1 - h) = softplus(score - log(Z m P_n)): the values of eq. 5, without overflow when exp(score)
        # is huge, one shift and one softplus per score.
        shift = log_z + math.log(self.num_negatives / self.bank.num_items)
        if shared:
            noise_term = shared_noise_term(scaled, rows, noise_logits.sub_(shift))
        else:  # in place (autograd allows it here): no second (B, m) tensor
            noise_term = softplus_sum(noise_logits.sub_(shift))
        return (softplus_sum(shift - pos_logits) + noise_term) / features.shape[0]

    def extra_repr(self) -> str:
        return (
            f"num_negatives={self.num_negatives}, temperature={self.temperature}, z_mode={self.z_mode}, "
            f"shared_negatives={self.shared_negatives}, proximal={self.proximal}, scoring={self.scoring}"
        )
