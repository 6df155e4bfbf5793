"""Weighted kNN against a brute-force reference; the linear probe on a separable problem."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from instdisc_lite import extract_features, linear_probe, weighted_knn
from instdisc_lite.evaluate import knn_neighbours


def clustered_problem(num_train=150, num_test=40, dim=8, num_classes=7, spread=0.9, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g)
    train_labels = torch.randint(num_classes, (num_train,), generator=g)
    test_labels = torch.randint(num_classes, (num_test,), generator=g)
    train = centres[train_labels] + spread * torch.randn(num_train, dim, generator=g)
    test = centres[test_labels] + spread * torch.randn(num_test, dim, generator=g)
    return train, train_labels, test, test_labels  # deliberately not normalised: weighted_knn does it


def brute_force_knn(train, train_labels, test, test_labels, k, tau, num_classes):
    """Plain loops and a full sort: cosine similarity, k best, votes exp(s/tau), top-1 and top-5.

    Returns one ``(top1 hit, top5 hit)`` per query; the top-5 hit is None when it is a matter of tie-breaking
    (the true class has no votes and ties with other vote-less classes at the 5th place).
    """
    train = [row / row.norm() for row in train.double()]
    test = [row / row.norm() for row in test.double()]
    k = min(k, len(train))
    hits = []
    for q, y in zip(test, test_labels.tolist(), strict=True):
        sims = [float(q @ t) for t in train]
        order = sorted(range(len(train)), key=lambda i: -sims[i])
        if k < len(train):  # no tie at the k-th neighbour that float32 rounding could flip
            assert sims[order[k - 1]] - sims[order[k]] > 1e-6
        votes = [0.0] * num_classes
        for i in order[:k]:
            votes[int(train_labels[i])] += math.exp(sims[i] / tau)
        ranking = sorted(range(num_classes), key=lambda c: -votes[c])
        assert votes[ranking[0]] > votes[ranking[1]] * (1 + 1e-6)  # a unique winner
        ambiguous = votes[y] == 0.0 and votes[ranking[4]] == 0.0
        hits.append((ranking[0] == y, None if ambiguous else y in ranking[:5]))
    return hits


@pytest.mark.parametrize("k", [1, 5, 20, 150, 500])
def test_weighted_knn_matches_brute_force(k):
    train, train_labels, test, test_labels = clustered_problem()
    hits = brute_force_knn(train, train_labels, test, test_labels, k, 0.1, 7)
    n = len(hits)
    top1 = 100.0 * sum(h1 for h1, _ in hits) / n
    sure5 = 100.0 * sum(h5 is True for _, h5 in hits) / n
    maybe5 = 100.0 * sum(h5 is None for _, h5 in hits) / n
    assert 0 < top1 < 100  # a non-trivial problem
    if k >= 20:
        assert maybe5 == 0  # enough neighbours that every query has a well-defined top-5
    for kwargs in ({}, {"bank_chunk": 7, "query_chunk": 3}, {"bank_chunk": 1, "query_chunk": 1},
                   {"bank_chunk": 64, "query_chunk": 17, "num_classes": 7}):  # fmt: skip
        got = weighted_knn(train, train_labels, test, test_labels, k=k, temperature=0.1, **kwargs)
        assert got["top1"] == pytest.approx(top1, abs=1e-9), kwargs
        assert sure5 - 1e-9 <= got["top5"] <= sure5 + maybe5 + 1e-9, kwargs
    # query by query, where the answer does not depend on tie-breaking
    for q in range(n):
        got = weighted_knn(train, train_labels, test[q : q + 1], test_labels[q : q + 1], k=k, temperature=0.1,
                           num_classes=7, bank_chunk=11)  # fmt: skip
        assert got["top1"] == 100.0 * hits[q][0]
        if hits[q][1] is not None:
            assert got["top5"] == 100.0 * hits[q][1]


def test_knn_neighbours_chunked_equals_full_sort():
    train, _, test, _ = clustered_problem(num_train=90, num_test=11, seed=1)
    train, test = F.normalize(train, dim=1), F.normalize(test, dim=1)
    full = (test @ train.T).sort(dim=1, descending=True)
    for chunk in (1, 4, 13, 90, 1000):
        sims, idx = knn_neighbours(train, test, k=10, bank_chunk=chunk)
        assert idx.shape == (11, 10)
        assert torch.equal(idx, full.indices[:, :10]), chunk
        torch.testing.assert_close(sims, full.values[:, :10])


def test_weighted_knn_temperature_weights_matter():
    # one near neighbour of class 0 against three far ones of class 1: a small tau lets the near one win
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0], [-0.1, 1.0]])
    labels = torch.tensor([0, 1, 1, 1])
    query = torch.tensor([[1.0, 0.8]])
    assert weighted_knn(train, labels, query, torch.tensor([0]), k=4, temperature=0.05)["top1"] == 100.0
    assert weighted_knn(train, labels, query, torch.tensor([1]), k=4, temperature=10.0)["top1"] == 100.0


def test_linear_probe_learns_separable_problem():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(3, 10, generator=g)

    def sample(n):
        x = torch.randn(n, 10, generator=g)
        scores = x @ w.T
        keep = (scores.topk(2, dim=1).values[:, 0] - scores.topk(2, dim=1).values[:, 1]) > 0.3  # a margin
        return x[keep], scores[keep].argmax(1)

    xtr, ytr = sample(400)
    xte, yte = sample(200)
    assert len(torch.unique(ytr)) == 3
    acc = linear_probe(xtr, ytr, xte, yte, epochs=100, lr=0.5, batch_size=1024)["top1"]
    assert acc >= 97.0
    # and a probe on shuffled labels cannot do that: the accuracy comes from the features
    shuffled = ytr[torch.randperm(len(ytr), generator=g)]
    assert linear_probe(xtr, shuffled, xte, yte, epochs=30, lr=0.5, batch_size=1024)["top1"] < 80.0


def test_extract_features_runs_in_eval_mode_and_restores_mode():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.9))
    model.train()
    x = torch.randn(10, 3)
    loader = [(x[:6], torch.arange(6), None), (x[6:], torch.arange(6, 10), None)]
    feats, labels = extract_features(model, loader, device="cpu")
    torch.testing.assert_close(feats, model[0](x).detach())  # no dropout applied
    assert torch.equal(labels, torch.arange(10)) and model.training


def test_extract_features_gather_orders_rows_by_dataset_index():
    """``gather=True`` (the default when distributed) returns rows by ``indices``, not by loader order."""
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(7, 3), torch.arange(7) % 3
    order = torch.tensor([4, 0, 6, 2, 5, 1, 3])
    loader = [(x[b], y[b], b) for b in order.split(3)]
    feats, labels = extract_features(model, loader, device="cpu", gather=True)
    torch.testing.assert_close(feats, model(x).detach())
    assert torch.equal(labels, y)
    unsorted, _ = extract_features(model, loader, device="cpu")  # one process, default: loader order
    torch.testing.assert_close(unsorted, model(x[order]).detach())
    with pytest.raises(ValueError, match="partition"):  # a repeated (padded) item, and a missing one
        extract_features(model, [(x[b], y[b], b) for b in (order[:4], order[3:6])], device="cpu", gather=True)
    with pytest.raises(ValueError, match="indices"):
        extract_features(model, [(x, y)], device="cpu", gather=True)
