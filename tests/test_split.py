"""LAYER_SPLIT weighs layers by their bytes (issue 17, item 5)."""

from __future__ import annotations

import pytest

from distributed.loading import plan_model
from distributed.split import balanced_split, plan_split
from models.tiny import make_tiny_model


@pytest.mark.parametrize("layers,ranks,counts", [(4, 3, [2, 1, 1]), (6, 3, [2, 2, 2]), (7, 3, [3, 2, 2]),
                                                 (31, 2, [16, 15]), (6, 6, [1] * 6)])
def test_equal_layers_split_evenly_the_first_ranks_taking_one_more(layers, ranks, counts):
    assert balanced_split([7] * layers, [1.0] * ranks) == counts


def test_a_heavy_layer_counts_for_its_bytes():
    # A first layer as heavy as nine others: by count it would share a rank with four.
    assert balanced_split([100] + [10] * 9, [1.0, 1.0]) == [1, 9]
    assert plan_split("even", [100] + [10] * 9, [1, 1]) == [(0, 1), (1, 10)]


def test_memory_shares_weigh_bytes_too():
    # Rank 1 has three times the memory: the least load per unit of memory puts 8 of 10 there.
    assert plan_split("memory", [10] * 10, [1, 3]) == [(0, 2), (2, 10)]
    assert all(end > start for start, end in plan_split("memory", [10] * 4, [1, 10**12, 1]))


def test_a_dense_first_layer_before_experts_is_weighed_as_it_is(tmp_path):
    """deepseek_v2's first layer is dense and lighter than the expert layers after it."""
    _, layer_bytes = plan_model(make_tiny_model("deepseek_v2", tmp_path / "deepseek_v2"))
    assert layer_bytes[0] < layer_bytes[1] == layer_bytes[2] == layer_bytes[3]
    assert plan_split("even", layer_bytes, [1, 1, 1]) == [(0, 2), (2, 3), (3, 4)]
