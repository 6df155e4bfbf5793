"""FLOP counting and run-time estimates (instdisc_lite.performance): counts agree with the analytic formulas."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from instdisc_lite.performance import (
    T4_ASSUMED,
    Throughput,
    conv2d_flops,
    estimate_seconds,
    flops_per_image,
    linear_flops,
)


def test_linear_forward_and_backward_flops_match_the_formula():
    layer = nn.Linear(64, 10, bias=False)
    forward = flops_per_image(layer, (64,), backward=False, batch_size=3)
    assert forward == linear_flops(64, 10) == 2 * 64 * 10
    # backward of a weight whose input needs no gradient: the weight gradient only, one more matrix product
    assert flops_per_image(layer, (64,), batch_size=3) == 2 * forward


def test_conv_flops_match_the_formula_and_do_not_depend_on_the_batch():
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1, bias=False)
    expected = conv2d_flops(3, 8, 3, 16, 16)
    assert flops_per_image(conv, (3, 16, 16), backward=False, batch_size=1) == expected
    assert flops_per_image(conv, (3, 16, 16), backward=False, batch_size=4) == expected
    strided = nn.Conv2d(4, 4, kernel_size=3, stride=2, padding=1, groups=2, bias=False)
    assert flops_per_image(strided, (4, 8, 8), backward=False) == conv2d_flops(4, 4, 3, 4, 4, groups=2)


def test_a_deeper_net_costs_backward_about_twice_forward_and_is_left_untouched():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(),
                        nn.Linear(8 * 8 * 8, 5))  # fmt: skip
    before = [p.detach().clone() for p in net.parameters()]
    fwd = flops_per_image(net, (3, 8, 8), backward=False)
    total = flops_per_image(net, (3, 8, 8), device="cpu")
    # every layer but the first also propagates the gradient to its input: 3 x forward, less the first's input grad
    first = conv2d_flops(3, 8, 3, 8, 8)
    assert total == 3 * fwd - first
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True)), "the model was changed"
    assert all(p.grad is None for p in net.parameters()), "the model's gradients were touched"


def test_estimate_seconds_divides_by_the_throughput():
    assert estimate_seconds(6e12, 2e12) == pytest.approx(3.0)
    slow = Throughput("test", 1e12, "made up")
    assert estimate_seconds(5e12, slow) == pytest.approx(5.0)
    assert math.isclose(estimate_seconds(T4_ASSUMED.flops_per_s, T4_ASSUMED), 1.0)
    with pytest.raises(ValueError, match="throughput"):
        estimate_seconds(1.0, 0.0)
    with pytest.raises(ValueError, match="flops"):
        estimate_seconds(-1.0, 1.0)
    with pytest.raises(ValueError, match="input_shape"):
        flops_per_image(nn.Linear(2, 2), (0,))


def test_runtime_estimates_cover_every_chapter_and_say_they_are_estimates():
    """results/runtime_estimates.json (benchmarks/scaling.py --parts flops): the schema the book reads."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    data = json.loads((root / "results" / "runtime_estimates.json").read_text())
    assert "ESTIMATE" in data and data["assumption"]["flops_per_s"] > 0 and data["provenance"]["git_commit"]
    chapters = sorted(p.stem for p in (root / "book").glob("[0-9][0-9]_*.ipynb"))
    assert sorted(data["chapters"]) == chapters, "rerun `python benchmarks/scaling.py --parts flops`"
    for name, est in data["chapters"].items():
        full, paper = est["full_t4_s_estimate"], est["paper_t4_s_estimate"]
        assert 0 <= full <= paper, f"{name}: the paper's 200 epochs never take less than full mode"
        runs = data["details"][name]["runs"]
        assert (full == 0) == (not runs), f"{name}: zero exactly when the chapter runs no network"
        assert all(r["evidence_found"] for r in runs), f"{name}: its notebook no longer sets up the runs counted"
