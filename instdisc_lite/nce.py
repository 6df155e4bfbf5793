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
    ) -> None:
        super().__init__(bank, temperature, proximal)
        if num_negatives < 1:
            raise ValueError(f"NCE needs num_negatives >= 1, got {num_negatives}")
        if z_mode not in Z_MODES:
            raise ValueError(f"z_mode must be one of {Z_MODES}, got {z_mode!r}")
        if not 0.0 <= z_momentum < 1.0:
            raise ValueError(f"z_momentum must be in [0, 1), got {z_momentum}")
        self.num_negatives = num_negatives
        self.z_mode = z_mode
        self.z_momentum = z_momentum
        self.shared_negatives = shared_negatives
        # Z < 0 means "not estimated yet"; a buffer, so it is saved with the checkpoint. Its dtype
        # follows its device only (see _apply), never the dtype casts of the module.
        self.register_buffer("z", torch.tensor(-1.0, dtype=z_dtype(bank.memory.device)))

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

    def noise_scores(self, features: torch.Tensor, noise_indices: torch.Tensor) -> torch.Tensor:
        """``v_{j_k}^T f_b / tau`` for every image b and noise sample k, shape ``(B, m)``."""
        noise_indices = noise_indices.to(self.bank.memory.device)
        if noise_indices.dim() == 1:  # shared: one (m, d) gather, one matmul
            return features @ self.bank.get(noise_indices).T / self.temperature
        noise = self.bank.get(noise_indices)  # (B, m, d)
        return torch.bmm(noise, features.unsqueeze(2)).squeeze(2) / self.temperature

    @torch.no_grad()
    def estimate_z(self, noise_logits: torch.Tensor) -> torch.Tensor:
        """Eq. 7 for a batch: ``n * mean(exp(noise scores))``, a scalar in :func:`z_dtype`, averaged over ranks.

        ``noise_logits`` is ``(B, m)`` (the scores divided by tau).
        """
        z_batch = noise_logits.to(z_dtype(noise_logits.device)).exp().mean() * self.bank.num_items
        return distributed.all_reduce_mean(z_batch)

    @torch.no_grad()
    def _current_z(self, noise_logits: torch.Tensor) -> torch.Tensor:
        if self.z.item() < 0:  # first batch: both modes start from the batch estimate
            self.z.fill_(self.estimate_z(noise_logits).item())
        elif self.z_mode == "running" and self.training:
            z_batch = self.estimate_z(noise_logits)
            self.z.mul_(self.z_momentum).add_((1.0 - self.z_momentum) * z_batch)
        return self.z

    def data_loss(
        self, features: torch.Tensor, indices: torch.Tensor, noise_indices: torch.Tensor | None = None
    ) -> torch.Tensor:
        if noise_indices is None:
            noise_indices = self.sample_noise(features.shape[0])
        pos_logits = (features * self.bank.get(indices)).sum(dim=1) / self.temperature  # (B,)
        noise_logits = self.noise_scores(features, noise_indices)  # (B, m)
        log_z = math.log(self._current_z(noise_logits).item())
        # log(m P_n) with P_n = 1/n. In log space: log h = -softplus(log(m/n) - log P), and
        # log(1 - h) = -softplus(log P - log(m/n)), with log P = score - log Z. Same values as eq. 5,
        # without overflow when exp(score) is huge.
        log_m_pn = math.log(self.num_negatives / self.bank.num_items)
        log_h_pos = -F.softplus(log_m_pn - (pos_logits - log_z))
        log_1m_h_noise = -F.softplus((noise_logits - log_z) - log_m_pn)
        return -(log_h_pos + log_1m_h_noise.sum(dim=1)).mean()

    def extra_repr(self) -> str:
        return (
            f"num_negatives={self.num_negatives}, temperature={self.temperature}, z_mode={self.z_mode}, "
            f"shared_negatives={self.shared_negatives}, proximal={self.proximal}"
        )
