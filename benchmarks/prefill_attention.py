"""Prefill attention alone in ONNX Runtime (CPU): the graphs' standard operators against ONNX Runtime's
fused kernels, at prompt lengths where the scores do and do not fit the CPU's caches.

Causal self-attention of S new tokens (a first prompt: the null-row past the bundles carry), 16
heads of 64, --layers layers each with its own q, k and v. Variants, each checked against our
PyTorch reference first:

  graphs      models/layers.py's cached_attention_block exported by torch.onnx, as in every bundle
              (what TensorRT builds, and what ONNX Runtime ran before export/fused_attention.py)
  gqa         com.microsoft.GroupQueryAttention: what the fused copies run for a first prompt
  mha         com.microsoft.MultiHeadAttention with unidirectional=1 (no grouped keys)
  attention23 the standard ONNX Attention op (opset 23), is_causal=1

Each figure: the median of --repeats passes over the layers, the variants taking turns.

    .venv/bin/python benchmarks/prefill_attention.py      # about 3 minutes on 2 cores; JSON in results/
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from common import machine, write_json  # this folder is sys.path[0] when run as a script

HEADS, DIM = 16, 64


def graphs_variant():
    """Our attention core as the exporter writes it, dynamic in the prompt's length."""
    import torch

    from mllm_edge.models.layers import cached_attention_block, causal_mask

    class Core(torch.nn.Module):
        def forward(self, q, past_k, past_v, new_k, new_v, mask):
            return cached_attention_block(q, past_k, past_v, new_k, new_v, mask, DIM**-0.5)

    s, past = 8, 1
    args = (
        torch.randn(1, s, HEADS, DIM),
        torch.zeros(past, 1, HEADS, DIM),
        torch.zeros(past, 1, HEADS, DIM),
        torch.randn(s, 1, HEADS, DIM),
        torch.randn(s, 1, HEADS, DIM),
        causal_mask(s),
    )
    seq, rows = torch.export.Dim("seq", min=2, max=8192), torch.export.Dim("past", min=1, max=8192)
    shapes = ({1: seq}, {0: rows}, {0: rows}, {0: seq}, {0: seq}, {0: seq, 1: seq})
    return torch.onnx.export(
        Core(), args, dynamo=True, dynamic_shapes=shapes, opset_version=20, verbose=False
    ).model_proto


def fused_variant(kind: str):
    from onnx import TensorProto, helper

    f, vi = TensorProto.FLOAT, helper.make_tensor_value_info
    inputs = [vi(n, f, [1, "S", HEADS * DIM]) for n in ("q", "k", "v")]
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)]
    scale = DIM**-0.5
    if kind == "gqa":
        inputs += [vi("seqlens_k", TensorProto.INT32, [1]), vi("total", TensorProto.INT32, [])]
        node = helper.make_node(
            "GroupQueryAttention",
            ["q", "k", "v", "", "", "seqlens_k", "total"],
            ["o", "present_k", "present_v"],
            domain="com.microsoft",
            num_heads=HEADS,
            kv_num_heads=HEADS,
            scale=scale,
        )
        outputs = [vi(n, f, None) for n in ("o", "present_k", "present_v")]
    elif kind == "mha":
        node = helper.make_node(
            "MultiHeadAttention",
            ["q", "k", "v"],
            ["o"],
            domain="com.microsoft",
            num_heads=HEADS,
            scale=scale,
            unidirectional=1,
        )
        outputs = [vi("o", f, None)]
    else:
        node = helper.make_node(
            "Attention",
            ["q", "k", "v"],
            ["o"],
            q_num_heads=HEADS,
            kv_num_heads=HEADS,
            scale=scale,
            is_causal=1,
        )
        outputs = [vi("o", f, None)]
        opsets = [helper.make_opsetid("", 23)]
    return helper.make_model(
        helper.make_graph([node], kind, inputs, outputs), opset_imports=opsets, ir_version=10
    )


def feeds(kind: str, names: list[str], q, k, v) -> dict:
    s = q.shape[1]
    if kind == "graphs":
        from mllm_edge.models.layers import causal_mask

        zeros = np.zeros((1, 1, HEADS, DIM), np.float32)
        values = (
            q,
            zeros,
            zeros,
            k.transpose(1, 0, 2, 3).copy(),
            v.transpose(1, 0, 2, 3).copy(),
            causal_mask(s).numpy(),
        )
        return dict(zip(names, values))
    out = {"q": q.reshape(1, s, -1), "k": k.reshape(1, s, -1), "v": v.reshape(1, s, -1)}
    if kind == "gqa":
        out |= {"seqlens_k": np.array([s - 1], np.int32), "total": np.array(s, np.int32)}
    return out


def reference(q, k, v) -> np.ndarray:
    import torch

    from mllm_edge.models.layers import attention, causal_mask

    t = [torch.from_numpy(x) for x in (q, k, v)]
    return attention(*t, causal_mask(q.shape[1]), DIM**-0.5).numpy()


def main() -> None:
    import onnxruntime as ort

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--lengths", default="589,2370", help="prompt lengths (LLaVA-1.5's 589, LLaVA-NeXT's 2370)"
    )
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "prefill_attention.json")
    args = p.parse_args()
    kinds = ["graphs", "gqa", "mha", "attention23"]
    sessions = {}
    for kind in kinds:
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        model = graphs_variant() if kind == "graphs" else fused_variant(kind)
        sessions[kind] = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
    rng = np.random.default_rng(0)
    rows = {}
    for length in map(int, args.lengths.split(",")):
        layers = [
            [rng.standard_normal((1, length, HEADS, DIM), dtype=np.float32) for _ in range(3)]
            for _ in range(args.layers)
        ]
        want = reference(*layers[0])
        passes = {}
        for kind, session in sessions.items():
            names = [i.name for i in session.get_inputs()]
            passes[kind] = [feeds(kind, names, *layer) for layer in layers]
            got = session.run(None, passes[kind][0])[0].reshape(want.shape)
            if np.abs(got - want).max() > 1e-4:
                raise SystemExit(
                    f"{kind}: attention differs from the reference; its timing would be of a wrong computation"
                )
            session.run(None, passes[kind][1])  # warm-up
        times = {kind: [] for kind in kinds}
        for i in range(args.repeats):
            for kind in kinds[i % len(kinds) :] + kinds[: i % len(kinds)]:
                start = time.perf_counter()
                for layer in passes[kind]:
                    sessions[kind].run(None, layer)
                times[kind].append((time.perf_counter() - start) * 1000)
        rows[length] = {kind: round(statistics.median(t), 1) for kind, t in times.items()}
        print(
            f"S={length}: "
            + ", ".join(f"{kind} {ms:.0f} ms" for kind, ms in rows[length].items())
            + f" ({args.layers} layers)"
        )
    write_json(
        args.json,
        {
            "machine": machine(),
            "settings": vars(args) | {"json": str(args.json)},
            "heads": HEADS,
            "head_dim": DIM,
            "ms_per_pass": rows,
        },
    )


if __name__ == "__main__":
    main()
