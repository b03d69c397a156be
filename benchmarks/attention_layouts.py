"""Decode attention in ONNX Runtime (CPU): KV-cache layouts and ONNX Runtime's attention ops, memory-bound.

One query token, 12 heads of 64, a context of --short and --long tokens, 12 layers each with its own
K and V (so, as in a real decode step, they do not stay in the CPU caches; a large buffer is also
rewritten before each step, standing in for the weight GEMMs). The step time's growth from short to
long context is what the context-growth target of issue 4 measures. Each variant's output is first
checked against numpy's. Variants:

  seq-first   K, V [T, 1, G, D], read through permutes ONNX Runtime folds into MatMul (transBatch):
              what the bundles use (models/layers.py: cached_attention)
  seq-first-A the same cache with K and V as MatMul's first operand (q and the scores transposed)
  seq-first-gemm  the same cache seen as one [T, G*D] matrix per layer, each read by one plain
              2-D MatMul: scores = K [T, G*D] x Q [G*D, H], where Q holds head h's query in the
              rows of its KV group and zeros elsewhere, and out = P [H, T] x V [T, G*D], whose
              diagonal blocks are the heads' outputs. H times the FLOPs of the others (trivial at
              one query row), but each cache byte is read by ONNX Runtime's multi-threaded GEMM
  head-major  K, V [1, G, T, D], each head contiguous: the fastest layout for the kernels, but its
              prefixes and slots are not contiguous, so a cache cannot be bound in place
  onnx-attention  the standard ONNX Attention op (opset 23) with 3-D K, V [1, T, G*D]: the same
              bytes as our cache, so it could read it in place; ONNX Runtime's kernel for it
  ort-gqa     ONNX Runtime's own fused decode attention, com.microsoft.GroupQueryAttention, over a
              head-major cache of --long rows that it writes in place (past and present bound to one
              buffer, as onnxruntime-genai runs it): the best ONNX Runtime offers, but an ORT-only op

    .venv/bin/python benchmarks/attention_layouts.py     # about a minute; JSON in benchmarks/results/
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from common import machine, write_json  # this folder is sys.path[0] when run as a script
from onnx import TensorProto, helper, numpy_helper

HEADS, DIM, LAYERS = 12, 64, 12


def gqa_graph(max_context: int):
    """One GroupQueryAttention node: q, k, v [1, 1, H*D]; past/present [1, H, max_context, D]."""
    f, vi = TensorProto.FLOAT, helper.make_tensor_value_info
    cache = [1, HEADS, max_context, DIM]
    inputs = [vi(n, f, [1, 1, HEADS * DIM]) for n in ("q", "k", "v")] + [
        vi("past_k", f, cache),
        vi("past_v", f, cache),
        vi("seqlens_k", TensorProto.INT32, [1]),
        vi("total", TensorProto.INT32, []),
    ]
    node = helper.make_node(
        "GroupQueryAttention",
        ["q", "k", "v", "past_k", "past_v", "seqlens_k", "total"],
        ["o", "present_k", "present_v"],
        domain="com.microsoft",
        num_heads=HEADS,
        kv_num_heads=HEADS,
        scale=1.0,
    )
    outputs = [vi("o", f, None), vi("present_k", f, cache), vi("present_v", f, cache)]
    graph = helper.make_graph([node], "ort-gqa", inputs, outputs)
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)],
        ir_version=10,
    )


def onnx_attention_graph():
    """One opset-23 Attention node: q [1, 1, H*D], k and v [1, T, H*D] (no scale, as the others)."""
    f, vi = TensorProto.FLOAT, helper.make_tensor_value_info
    node = helper.make_node(
        "Attention", ["q", "k", "v"], ["o"], q_num_heads=HEADS, kv_num_heads=HEADS, scale=1.0
    )
    graph = helper.make_graph(
        [node],
        "onnx-attention",
        [
            vi("q", f, [1, 1, HEADS * DIM]),
            vi("k", f, [1, "T", HEADS * DIM]),
            vi("v", f, [1, "T", HEADS * DIM]),
        ],
        [vi("o", f, None)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)


def attention_graph(layout: str):
    f = TensorProto.FLOAT
    seq_first = layout != "head-major"
    kv_shape = ["T", 1, HEADS, DIM] if seq_first else [1, HEADS, "T", DIM]
    inputs = [
        helper.make_tensor_value_info("q", f, [1, HEADS, 1, DIM]),
        helper.make_tensor_value_info("k", f, kv_shape),
        helper.make_tensor_value_info("v", f, kv_shape),
    ]
    node, initializers = helper.make_node, []
    if layout == "seq-first":
        nodes = [
            node("Transpose", ["k"], ["kt"], perm=[1, 2, 3, 0]),
            node("MatMul", ["q", "kt"], ["s"]),
            node("Softmax", ["s"], ["p"], axis=-1),
            node("Transpose", ["v"], ["vt"], perm=[1, 2, 0, 3]),
            node("MatMul", ["p", "vt"], ["o"]),
        ]
    elif layout == "seq-first-A":
        nodes = [
            node("Transpose", ["k"], ["ka"], perm=[1, 2, 0, 3]),
            node("Transpose", ["q"], ["qt"], perm=[0, 1, 3, 2]),
            node("MatMul", ["ka", "qt"], ["st"]),
            node("Transpose", ["st"], ["s"], perm=[0, 1, 3, 2]),
            node("Softmax", ["s"], ["p"], axis=-1),
            node("Transpose", ["p"], ["pt"], perm=[0, 1, 3, 2]),
            node("Transpose", ["v"], ["va"], perm=[1, 2, 3, 0]),
            node("MatMul", ["va", "pt"], ["ot"]),
            node("Transpose", ["ot"], ["o"], perm=[0, 1, 3, 2]),
        ]
    elif layout == "seq-first-gemm":
        eye = np.eye(HEADS, dtype=np.float32)  # group g of head h (G = H here: the identity)
        initializers = [
            numpy_helper.from_array(eye.reshape(HEADS, 1, HEADS), "group_of_column"),
            numpy_helper.from_array(eye.reshape(HEADS, HEADS, 1), "group_of_row"),
            numpy_helper.from_array(np.array([HEADS, DIM], np.int64), "h_d"),
            numpy_helper.from_array(np.array([-1, HEADS * DIM], np.int64), "t_gd"),
            numpy_helper.from_array(np.array([HEADS * DIM, HEADS], np.int64), "gd_h"),
            numpy_helper.from_array(np.array([HEADS, HEADS, DIM], np.int64), "h_g_d"),
            numpy_helper.from_array(np.array([1, HEADS, 1, DIM], np.int64), "o_shape"),
            numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        ]
        nodes = [
            node("Reshape", ["q", "h_d"], ["q2"]),
            node("Transpose", ["q2"], ["qt"], perm=[1, 0]),  # [D, H]
            node("Mul", ["qt", "group_of_column"], ["qg"]),  # [G, D, H]: zero outside h's group
            node("Reshape", ["qg", "gd_h"], ["qbd"]),  # [G*D, H]
            node("Reshape", ["k", "t_gd"], ["k2"]),  # [T, G*D], the cache's bytes as they lie
            node("MatMul", ["k2", "qbd"], ["st"]),  # [T, H]
            node("Transpose", ["st"], ["s"], perm=[1, 0]),
            node("Softmax", ["s"], ["p"], axis=-1),
            node("Reshape", ["v", "t_gd"], ["v2"]),
            node("MatMul", ["p", "v2"], ["pv"]),  # [H, G*D]: row h's block g(h) is head h's output
            node("Reshape", ["pv", "h_g_d"], ["pv3"]),
            node("Mul", ["pv3", "group_of_row"], ["own"]),
            node("ReduceSum", ["own", "axis1"], ["o2"], keepdims=0),
            node("Reshape", ["o2", "o_shape"], ["o"]),
        ]
    else:
        nodes = [
            node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
            node("MatMul", ["q", "kt"], ["s"]),
            node("Softmax", ["s"], ["p"], axis=-1),
            node("MatMul", ["p", "v"], ["o"]),
        ]
    outputs = [helper.make_tensor_value_info("o", f, None)]
    graph = helper.make_graph(nodes, layout, inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


def reference_attention(q, k, v):
    """q [H, D], k and v [H, T, D] -> softmax(q k^T) v, [H, D] (no scale: all layouts omit it)."""
    scores = np.einsum("hd,htd->ht", q, k)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("ht,htd->hd", p / p.sum(-1, keepdims=True), v)


def prepare_step(session, context: int, layout: str, max_context: int):
    """-> a function running one decode step's attention over LAYERS layers; checked against numpy first."""
    rng = np.random.default_rng(0)
    if layout == "ort-gqa":  # the new row goes in at context - 1, written in place: present bound to past
        q = rng.random((1, 1, HEADS * DIM), np.float32)
        steps = []
        for _ in range(LAYERS):
            k, v = (rng.random((1, HEADS, max_context, DIM), np.float32) for _ in range(2))
            binding = session.io_binding()
            feeds = {
                "q": q,
                "k": q,
                "v": q,
                "past_k": k,
                "past_v": v,
                "seqlens_k": np.array([context - 1], np.int32),
                "total": np.array(context, np.int32),
            }
            for name, array in feeds.items():
                binding.bind_cpu_input(name, array)
            binding.bind_output("o", "cpu")
            for name, array in (("present_k", k), ("present_v", v)):
                binding.bind_output(name, "cpu", 0, np.float32, list(array.shape), array.ctypes.data)
            steps.append(binding)
        run = lambda binding: session.run_with_iobinding(binding)  # noqa: E731
        first = (
            q.reshape(HEADS, DIM),
            k[0, :, :context],
            v[0, :, :context],
        )  # layer LAYERS - 1's, as [H, D] and [H, T, D]
    else:
        shape = (context, 1, HEADS, DIM) if layout != "head-major" else (1, HEADS, context, DIM)
        q = rng.random((1, HEADS, 1, DIM), np.float32)
        steps = [
            {"q": q, "k": rng.random(shape, np.float32), "v": rng.random(shape, np.float32)}
            for _ in range(LAYERS)
        ]
        k, v = steps[0]["k"], steps[0]["v"]
        first = (
            q.reshape(HEADS, DIM),
            *((x[:, 0].transpose(1, 0, 2) if layout != "head-major" else x[0]) for x in (k, v)),
        )
        if layout == "onnx-attention":  # the same bytes, seen as [1, T, H*D]
            steps = [
                {
                    "q": q.reshape(1, 1, HEADS * DIM),
                    "k": layer["k"].reshape(1, context, HEADS * DIM),
                    "v": layer["v"].reshape(1, context, HEADS * DIM),
                }
                for layer in steps
            ]
        run = lambda feeds: session.run(None, feeds)  # noqa: E731

    def step():
        for layer in steps:
            run(layer)

    check = steps[-1] if layout == "ort-gqa" else steps[0]  # the layer `first` describes
    run(check)
    out = (check.get_outputs()[0].numpy() if layout == "ort-gqa" else session.run(None, check)[0]).reshape(
        HEADS, DIM
    )
    if np.abs(out - reference_attention(*first)).max() > 1e-4:
        raise SystemExit(
            f"{layout}: attention output differs from numpy's; the timing would be of a wrong computation"
        )

    for _ in range(3):
        step()
    return step


def time_ms(step, evict: np.ndarray, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        evict += 1  # the weight GEMMs' traffic between two steps
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--short", type=int, default=100)
    p.add_argument("--long", type=int, default=1500)
    p.add_argument("--repeats", type=int, default=5, help="steps timed per context in each round")
    p.add_argument(
        "--rounds", type=int, default=3, help="rounds taking every variant in turn, in rotating order"
    )
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "attention_layouts.json")
    args = p.parse_args()
    kv_mb = 2 * LAYERS * (args.long - args.short) * HEADS * DIM * 4 / 1e6
    layouts = ["seq-first", "seq-first-A", "seq-first-gemm", "head-major", "onnx-attention", "ort-gqa"]
    steps = {}
    for layout in layouts:
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        model = {"ort-gqa": lambda: gqa_graph(args.long), "onnx-attention": onnx_attention_graph}.get(
            layout, lambda layout=layout: attention_graph(layout)
        )()
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        steps[layout] = {
            context: prepare_step(session, context, layout, args.long) for context in (args.short, args.long)
        }
    evict = np.ones(50_000_000, np.float32)  # 200 MB
    times = {(layout, context): [] for layout in layouts for context in (args.short, args.long)}
    for i in range(args.rounds):  # side by side: a slow spell of the machine falls on every variant alike
        for layout in layouts[i % len(layouts) :] + layouts[: i % len(layouts)]:
            for context, step in steps[layout].items():
                times[layout, context] += time_ms(step, evict, args.repeats)
    rows = {}
    print(
        f"{'layout':<15} {'short ms':>9} {'long ms':>8} {'growth ms':>10} {'GB/s':>6}   ({LAYERS} layers, contexts {args.short} and {args.long})"
    )
    for layout in layouts:
        short, long_ = (statistics.median(times[layout, context]) for context in (args.short, args.long))
        growth = long_ - short
        rows[layout] = {
            "short_ms": round(short, 3),
            "long_ms": round(long_, 3),
            "growth_ms": round(growth, 3),
            "extra_kv_gb_per_s": round(kv_mb / 1e3 / (growth / 1e3), 1),
        }
        print(
            f"{layout:<15} {short:>9.2f} {long_:>8.2f} {growth:>10.2f} {rows[layout]['extra_kv_gb_per_s']:>6.1f}"
        )
    write_json(
        args.json,
        {
            "machine": machine(),
            "settings": vars(args) | {"json": str(args.json)},
            "heads": HEADS,
            "head_dim": DIM,
            "layers": LAYERS,
            "extra_kv_mb": round(kv_mb, 1),
            "layouts": rows,
        },
    )


if __name__ == "__main__":
    main()
