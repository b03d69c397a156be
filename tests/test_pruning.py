"""The pruning rules of docs/methods.md: keep counts, parameter checks, and token selection."""

import pytest
import torch

from mllm_edge.errors import MllmEdgeError
from mllm_edge.pruning import (
    PruningConfig,
    check_fastv_layer,
    fastervlm_select,
    fastv_select,
    gather_tokens,
    keep_count,
    top_k_in_order,
)


# docs/methods.md's table for 576 image tokens.
@pytest.mark.parametrize(
    "ratio, kept", [(0.0, 576), (0.25, 432), (0.5, 288), (0.75, 144), (0.9, 58), (0.95, 29)]
)
def test_keep_count_matches_methods_table(ratio, kept):
    assert keep_count(576, ratio) == kept


def test_keep_count_rounds_like_python_round_on_halves():
    assert keep_count(9, 0.5) == 4  # 4.5 -> 4: round half to even, not half up
    assert keep_count(5, 0.5) == 2  # 2.5 -> 2
    assert keep_count(7, 0.5) == 4  # 3.5 -> 4


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan"), "0.5"])
def test_ratio_out_of_range_is_rejected(ratio):
    with pytest.raises(MllmEdgeError, match="ratio"):
        keep_count(576, ratio)


def test_ratio_that_keeps_nothing_is_rejected():
    with pytest.raises(MllmEdgeError, match="keeps no image token"):
        keep_count(9, 0.95)


@pytest.mark.parametrize("k", [0, -1, 32, 40, 2.0, True])
def test_fastv_layer_out_of_range_is_rejected(k):
    with pytest.raises(MllmEdgeError, match="1 <= K < 32"):
        check_fastv_layer(k, 32)


def test_fastv_layer_in_range():
    assert check_fastv_layer(1, 32) == 1 and check_fastv_layer(31, 32) == 31


def test_from_method():
    assert PruningConfig.from_method("none") == PruningConfig()
    both = PruningConfig.from_method("fastv+fastervlm", 0.5, 3, vision_ratio=0.75)
    assert both.fastv.ratio == 0.5 and both.fastv.k == 3 and both.fastervlm.ratio == 0.75
    assert both.keep_counts(576) == (144, 72)  # FastV ranks FasterVLM's survivors, with its own ratio
    with pytest.raises(MllmEdgeError, match="unknown pruning method 'fastvv'"):
        PruningConfig.from_method("fastvv", 0.5)
    with pytest.raises(MllmEdgeError, match="1 <= K < 4"):
        PruningConfig.from_method("fastv", 0.5, k=0).validate(num_layers=4)
    with pytest.raises(MllmEdgeError, match="without a pruning method"):
        PruningConfig.from_method("none", 0.5)
    with pytest.raises(MllmEdgeError, match="only when both methods run"):
        PruningConfig.from_method("fastv", 0.5, vision_ratio=0.5)


def test_top_k_breaks_ties_toward_lower_index_and_keeps_order():
    scores = torch.tensor([[0.1, 0.5, 0.5, 0.2, 0.5, 0.9]])
    assert top_k_in_order(scores, 3).tolist() == [[1, 2, 5]]
    assert top_k_in_order(torch.zeros(1, 6), 2).tolist() == [[0, 1]]


def test_top_k_is_per_batch_row():
    scores = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    assert top_k_in_order(scores, 2).tolist() == [[0, 1], [2, 3]]
    assert fastervlm_select(scores, 1).tolist() == [[0], [3]]


@pytest.mark.parametrize("start, n, keep, total", [(3, 8, 3, 14), (0, 5, 2, 9), (4, 5, 5, 9), (2, 6, 1, 8)])
def test_fastv_select_keeps_text_and_top_image_tokens_in_order(start, n, keep, total):
    torch.manual_seed(start + n)
    row = torch.rand(2, total)
    kept_image, kept_positions = fastv_select(row, start, n, keep)
    for b in range(2):
        scores = row[b, start : start + n].tolist()
        best = sorted(sorted(range(n), key=lambda i: (-scores[i], i))[:keep])
        assert kept_image[b].tolist() == best
        expected = list(range(start)) + [start + i for i in best] + list(range(start + n, total))
        assert kept_positions[b].tolist() == expected


def test_fastv_select_takes_a_tensor_start():
    row = torch.rand(1, 10)
    a = fastv_select(row, 2, 4, 2)
    b = fastv_select(row, torch.tensor(2), 4, 2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_gather_tokens():
    x = torch.arange(2 * 5 * 3).reshape(2, 5, 3)
    idx = torch.tensor([[0, 4], [1, 2]])
    out = gather_tokens(x, idx)
    assert out.shape == (2, 2, 3)
    assert torch.equal(out[0], x[0, [0, 4]]) and torch.equal(out[1], x[1, [1, 2]])
    assert torch.equal(gather_tokens(torch.arange(5)[None], torch.tensor([[3, 1]])), torch.tensor([[3, 1]]))


def test_flops_reproduce_the_fastv_papers_13b_row():
    """docs/methods.md: LLaVA-1.5-13B (40 layers, d 5120, m 13824), 36 text + 576 image tokens; the paper's
    13B cells follow from its Eq. 5 exactly (per-layer averages, in billions)."""
    from mllm_edge.pruning.flops import prefill_flops

    cells = {(2, 0.5): 84.6, (2, 0.75): 50.2, (3, 0.5): 86.4, (3, 0.75): 52.9}
    for (k, ratio), expected in cells.items():
        keep = keep_count(576, ratio)
        flops = prefill_flops(40, 5120, 13824, 36, 576, 576, keep, k)
        assert round(flops.unpruned / 1e9, 1) == 154.6
        assert round(flops.pruned / 1e9, 1) == expected
    # no FastV (k=0), FasterVLM alone at 75%: every layer sees 36 + 144 tokens
    alone = prefill_flops(40, 5120, 13824, 36, 576, 144, 144, 0)
    assert alone.pruned == prefill_flops(40, 5120, 13824, 36, 144, 144, 144, 0).unpruned
