"""The memory bank: momentum update, repeated indices, no autograd, device moves, state_dict."""

from __future__ import annotations

import pytest
import torch

from instdisc_lite import MemoryBank


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def random_features(batch: int, dim: int, seed: int) -> torch.Tensor:
    return unit(torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed)))


def test_bank_initialised_with_random_unit_rows():
    bank = MemoryBank(500, 32, generator=torch.Generator().manual_seed(0))
    assert bank.memory.shape == (500, 32)
    torch.testing.assert_close(bank.memory.norm(dim=1), torch.ones(500))
    # random directions: no two rows alike, mean close to the origin
    sims = bank.memory @ bank.memory.T - torch.eye(500)
    assert sims.abs().max() < 0.9
    assert bank.memory.mean(0).norm() < 0.2
    again = MemoryBank(500, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(bank.memory, again.memory)


@pytest.mark.parametrize("momentum", [0.5, 0.0, 0.9])
def test_update_unique_indices_matches_formula(momentum):
    bank = MemoryBank(20, 8, momentum=momentum, generator=torch.Generator().manual_seed(1))
    old = bank.memory.clone()
    idx = torch.tensor([4, 0, 19, 7])
    feats = random_features(4, 8, seed=2)
    bank.update(idx, feats)
    for b, i in enumerate(idx.tolist()):
        expected = unit(momentum * old[i] + (1 - momentum) * feats[b])
        torch.testing.assert_close(bank.memory[i], expected, rtol=1e-6, atol=1e-6)
    untouched = [i for i in range(20) if i not in idx.tolist()]
    assert torch.equal(bank.memory[untouched], old[untouched])
    torch.testing.assert_close(bank.memory.norm(dim=1), torch.ones(20))


def test_update_repeated_indices_averages_and_is_order_independent():
    bank = MemoryBank(10, 6, momentum=0.5, generator=torch.Generator().manual_seed(3))
    old = bank.memory.clone()
    idx = torch.tensor([3, 7, 3, 3, 9, 7])
    feats = random_features(6, 6, seed=4)
    bank.update(idx, feats)
    expected = {
        3: unit(0.5 * old[3] + 0.5 * (feats[0] + feats[2] + feats[3]) / 3),
        7: unit(0.5 * old[7] + 0.5 * (feats[1] + feats[5]) / 2),
        9: unit(0.5 * old[9] + 0.5 * feats[4]),
    }
    for i, row in expected.items():
        torch.testing.assert_close(bank.memory[i], row, rtol=1e-6, atol=1e-6)
    others = [0, 1, 2, 4, 5, 6, 8]
    assert torch.equal(bank.memory[others], old[others])
    torch.testing.assert_close(bank.memory.norm(dim=1), torch.ones(10))
    # any order of the same batch gives the same bank
    for seed in range(3):
        perm = torch.randperm(6, generator=torch.Generator().manual_seed(seed))
        other = MemoryBank(10, 6, momentum=0.5)
        other.memory.copy_(old)
        other.update(idx[perm], feats[perm])
        torch.testing.assert_close(other.memory, bank.memory, rtol=1e-6, atol=1e-6)


def test_update_does_not_track_autograd():
    bank = MemoryBank(12, 4)
    weight = torch.randn(4, 4, requires_grad=True)
    feats = unit(torch.randn(3, 4) @ weight)  # part of a graph
    assert feats.requires_grad
    bank.update(torch.tensor([0, 1, 2]), feats)
    assert not bank.memory.requires_grad and bank.memory.grad_fn is None
    assert list(bank.parameters()) == []
    assert bank.get(torch.tensor([0, 1])).grad_fn is None


def test_update_rejects_wrong_feature_shape():
    bank = MemoryBank(12, 4)
    with pytest.raises(ValueError, match="shape"):
        bank.update(torch.tensor([0, 1]), torch.randn(2, 5))


def test_bank_moves_with_to_and_is_in_state_dict():
    bank = MemoryBank(16, 4, generator=torch.Generator().manual_seed(5))
    assert "memory" in bank.state_dict()
    assert torch.equal(bank.state_dict()["memory"], bank.memory)
    double = MemoryBank(16, 4).to(torch.float64)
    assert double.memory.dtype == torch.float64
    meta = MemoryBank(16, 4).to("meta")
    assert meta.memory.device.type == "meta"
    restored = MemoryBank(16, 4, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(restored.memory, bank.memory)
    restored.load_state_dict(bank.state_dict())
    assert torch.equal(restored.memory, bank.memory)
    # and it travels inside a module that holds it (as the objectives do)
    holder = torch.nn.Module()
    holder.bank = bank
    assert "bank.memory" in holder.state_dict()


def test_fill_normalises():
    bank = MemoryBank(5, 3)
    raw = torch.randn(5, 3, generator=torch.Generator().manual_seed(7)) * 4
    bank.fill(raw)
    torch.testing.assert_close(bank.memory, unit(raw))


def test_age_counts_steps_since_each_row_was_written():
    bank = MemoryBank(6, 4)
    assert bank.age().tolist() == [0] * 6
    bank.update(torch.tensor([0, 2]), random_features(2, 4, seed=0))
    bank.update(torch.tensor([2, 5, 5]), random_features(3, 4, seed=1))  # a repeated index is one write
    bank.update(torch.tensor([1]), random_features(1, 4, seed=2))
    assert bank.age().tolist() == [2, 0, 1, 3, 3, 1]  # never written: as old as the bank
    bank.fill(random_features(6, 4, seed=3))
    assert bank.age().tolist() == [0] * 6
    state = bank.state_dict()
    assert int(state["updates"]) == 3 and set(state) == {"memory", "updates", "written_at"}  # resumed exactly
