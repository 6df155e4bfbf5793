"""The reported figures the book quotes: instdisc_lite/paper_results.yaml, read by instdisc_lite.book.paper_results."""

from __future__ import annotations

import pytest

from instdisc_lite.book import paper_results

FIELDS = {"description", "source", "source_kind", "unchecked", "unit", "figures"}


def _numbers(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _numbers(value)
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield tree


@pytest.mark.parametrize("name", sorted(paper_results()))
def test_every_group_is_sourced_and_flagged(name):
    group = paper_results()[name]
    assert FIELDS <= set(group), f"{name}: missing {FIELDS - set(group)}"
    assert group["source_kind"] in ("paper", "README", "issue")
    assert isinstance(group["unchecked"], bool)
    assert list(_numbers(group["figures"])), f"{name}: no numbers"


def test_known_figures():
    results = paper_results()
    table1 = results["cifar10_resnet18"]
    assert table1["unchecked"] and table1["source_kind"] == "paper"
    assert table1["figures"]["nonparametric_softmax"] == {"linear_svm": 75.4, "knn": 80.8}
    assert table1["figures"]["nce_m4096"]["knn"] == 80.4
    assert results["imagenet_released_models"]["figures"]["resnet50"]["knn"] == 46.8
    assert not results["imagenet_released_models"]["unchecked"]
    assert results["imagenet_embedding_size"]["figures"]["knn_by_dim"][128] == 41.0
    assert results["training_cost"]["source_kind"] == "issue"


def test_returns_a_fresh_dict():
    paper_results()["cifar10_resnet18"]["figures"].clear()
    assert paper_results()["cifar10_resnet18"]["figures"], "paper_results() must not share state between calls"
