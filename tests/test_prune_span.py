"""FastV's selection over an image span whose length varies (LLaVA-NeXT's prune graph, issue 18):
eager and exported, it keeps what fastv_select keeps for that span's own length and keep count,
with every TopK's k a constant (the lint's rule) and no shape that depends on data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.export import Dim

from mllm_edge import graphs as g
from mllm_edge.errors import MllmEdgeError
from mllm_edge.export.graphs import PruneSpanGraph
from mllm_edge.export.lint import lint_model
from mllm_edge.export.onnx_graph import export_graph
from mllm_edge.pruning import fastv_select, keep_count, keep_table

MAX_SPAN, RATIO, WIDTH = 60, 0.5, 8


def expected(row: np.ndarray, start: int, n: int, ratio: float) -> np.ndarray:
    """The kept image indices computed here: a stable descending rank of the span's scores (ties to
    the lower index), the first keep_count(n, R), ascending."""
    keep = keep_count(n, ratio)
    order = np.argsort(-row[:, start : start + n], axis=1, kind="stable")[:, :keep]
    return np.sort(order, axis=1)


def case(rng, b: int, t: int, start: int, n: int):
    hidden = rng.standard_normal((b, t, WIDTH)).astype(np.float32)
    row = rng.random((b, t)).astype(np.float32)
    if n >= 8:
        row[:, start : start + 3] = row[:, start + 5 : start + 8]  # ties inside the span
    positions = np.broadcast_to(np.arange(t, dtype=np.int64), (b, t)).copy()
    return hidden, row, positions, np.arange(start, start + n, dtype=np.int64)


# (batch, prompt length, span start, span length): the longest span, odd lengths where R = 0.5's
# round-half-even matters (21 -> 10, 23 -> 12, 3 -> 2), a span at the prompt's start and end
CASES = [(1, 70, 3, 60), (2, 40, 5, 21), (2, 40, 5, 23), (1, 12, 2, 3), (1, 30, 0, 29), (3, 100, 63, 37)]


def test_keep_table_is_keep_count_at_every_length():
    for ratio in (0.0, 0.5, 0.75, 0.9):
        table = keep_table(MAX_SPAN, ratio)
        assert len(table) == MAX_SPAN + 1
        for n in range(1, MAX_SPAN + 1):
            try:
                assert table[n] == keep_count(n, ratio)
            except MllmEdgeError:  # keeps none: a span that short never reaches the graph
                assert table[n] == 1
    assert keep_table(10, 0.5)[1:6] == [1, 1, 2, 2, 2]  # round(0.5 n): 0->1, 1, 1.5->2, 2, 2.5->2


@pytest.mark.parametrize("b, t, start, n", CASES)
def test_eager_selection_is_fastv_select_at_the_spans_own_length(b, t, start, n):
    module = PruneSpanGraph(MAX_SPAN, RATIO).eval()
    hidden, row, positions, span = case(np.random.default_rng(n), b, t, start, n)
    kept_hidden, kept_positions, kept_image = module(*map(torch.from_numpy, (hidden, row, positions, span)))
    ref_image, ref_positions = fastv_select(torch.from_numpy(row), start, n, keep_count(n, RATIO))
    np.testing.assert_array_equal(kept_image.numpy(), expected(row, start, n, RATIO))
    np.testing.assert_array_equal(kept_image.numpy(), ref_image.numpy())
    np.testing.assert_array_equal(kept_positions.numpy(), ref_positions.numpy())
    np.testing.assert_array_equal(kept_hidden.numpy(), hidden[np.arange(b)[:, None], ref_positions.numpy()])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The graph exported once, traced at one span length, run at the others."""
    folder = tmp_path_factory.mktemp("prune_span")
    module = PruneSpanGraph(MAX_SPAN, RATIO).eval()
    args = tuple(map(torch.from_numpy, case(np.random.default_rng(0), 2, 50, 5, 30)))
    dims = {
        "batch": Dim("batch", min=1, max=16),
        "seq": Dim("seq", min=1, max=256),
        "image_tokens": Dim("image_tokens", min=1, max=MAX_SPAN),
    }
    shapes = tuple(
        {axis: dims[name] for axis, name in enumerate(t.dims) if name} for t in g.PRUNE_SPAN_GRAPH.inputs
    )
    spec = export_graph(module, args, shapes, folder, g.PRUNE)
    return folder / spec.file, spec


def test_the_exported_graph_passes_the_lint_with_constant_k(exported):
    import onnx

    path, spec = exported
    assert lint_model(path) == []
    model = onnx.load(str(path))
    topks = [n for n in model.graph.node if n.op_type == "TopK"]
    assert len(topks) == 2  # rank, then back into order: both at the most any span keeps
    assert not {n.op_type for n in model.graph.node} & {"NonZero", "Unique", "Loop", "If"}
    assert [t.name for t in spec.inputs] == g.PRUNE_SPAN_GRAPH.input_names()


@pytest.mark.parametrize("b, t, start, n", CASES)
def test_onnx_runtime_keeps_what_fastv_select_keeps(exported, b, t, start, n):
    ort = pytest.importorskip("onnxruntime")
    path, _ = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    hidden, row, positions, span = case(np.random.default_rng(n + 100), b, t, start, n)
    names = g.PRUNE_SPAN_GRAPH.input_names()
    kept_hidden, kept_positions, kept_image = session.run(
        g.PRUNE_SPAN_GRAPH.output_names(), dict(zip(names, (hidden, row, positions, span)))
    )
    ref_image, ref_positions = fastv_select(torch.from_numpy(row), start, n, keep_count(n, RATIO))
    np.testing.assert_array_equal(kept_image, expected(row, start, n, RATIO))
    np.testing.assert_array_equal(kept_positions, ref_positions.numpy())
    np.testing.assert_array_equal(kept_hidden, hidden[np.arange(b)[:, None], ref_positions.numpy()])
