"""The selection functions trace into ONNX graphs that select exactly what PyTorch selects.

This is what "traceable" means for pruning/: TopK with a constant k, no data-dependent shapes, the
same tie-break (lower index first) in ONNX Runtime as in eager PyTorch.
"""

import pytest
import torch

from mllm_edge.pruning import fastervlm_select, fastv_select, gather_tokens

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

NUM_IMAGE, KEEP = 16, 6
# Ops TensorRT 10 cannot build, or builds only with data-dependent shapes.
FORBIDDEN = {"NonZero", "CumSum", "ScatterND", "Loop", "If", "Unique"}


class FastVPrune(torch.nn.Module):
    def forward(self, hidden, scores, position_ids, image_start):
        kept_image, kept_positions = fastv_select(scores, image_start, NUM_IMAGE, KEEP)
        return gather_tokens(hidden, kept_positions), gather_tokens(position_ids, kept_positions), kept_image


class FasterVLMPrune(torch.nn.Module):
    def forward(self, features, cls_row):
        kept = fastervlm_select(cls_row, KEEP)
        return gather_tokens(features, kept), kept


def export(module, args, dynamic_shapes, path):
    torch.onnx.export(
        module,
        args,
        str(path),
        dynamo=True,
        opset_version=20,
        dynamic_shapes=dynamic_shapes,
        external_data=False,
        verbose=False,
    )
    graph = onnx.load(str(path)).graph
    ops = {node.op_type for node in graph.node}
    assert not ops & FORBIDDEN
    assert "TopK" in ops, "selection must be a TopK with a constant k"
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def tied_scores(batch: int, length: int, seed: int) -> torch.Tensor:
    """Random scores with runs of exact ties, so the tie-break is exercised."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 5, (batch, length), generator=g) / 4.0).float()


def test_fastv_prune_graph_matches_pytorch_for_any_prompt_length(tmp_path):
    t = 30
    args = (
        torch.randn(2, t, 8),
        tied_scores(2, t, 0),
        torch.arange(t).expand(2, t).contiguous(),
        torch.tensor(4),
    )
    seq = torch.export.Dim("seq", min=NUM_IMAGE + 1, max=4096)
    session = export(FastVPrune(), args, ({1: seq}, {1: seq}, {1: seq}, None), tmp_path / "prune.onnx")
    for t, start, seed in ((30, 4, 1), (57, 0, 2), (40, 24, 3), (100, 50, 4)):
        inputs = (
            torch.randn(2, t, 8),
            tied_scores(2, t, seed),
            torch.arange(t).expand(2, t).contiguous(),
            torch.tensor(start),
        )
        feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
        for got, want in zip(session.run(None, feeds), FastVPrune()(*inputs)):
            assert (got == want.numpy()).all()


def test_fastervlm_prune_graph_matches_pytorch(tmp_path):
    args = (torch.randn(2, NUM_IMAGE, 8), tied_scores(2, NUM_IMAGE, 0))
    session = export(FasterVLMPrune(), args, None, tmp_path / "vision_prune.onnx")
    for seed in range(4):
        inputs = (torch.randn(2, NUM_IMAGE, 8), tied_scores(2, NUM_IMAGE, seed))
        feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
        for got, want in zip(session.run(None, feeds), FasterVLMPrune()(*inputs)):
            assert (got == want.numpy()).all()
