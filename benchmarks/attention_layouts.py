"""Decode attention in ONNX Runtime (CPU) for three ways to lay out the KV cache, memory-bound.

One query token, 12 heads of 64, a context of --short and --long tokens, 12 layers each with its own
K and V (so, as in a real decode step, they do not stay in the CPU caches; a large buffer is also
rewritten before each step, standing in for the weight GEMMs). The step time's growth from short to
long context is what the context-growth target of issue 4 measures. Layouts:

  seq-first   K, V [T, 1, G, D], read through permutes ONNX Runtime folds into MatMul (transBatch):
              what the bundles use (models/layers.py: cached_attention)
  seq-first-A the same cache with K and V as MatMul's first operand (q and the scores transposed)
  head-major  K, V [1, G, T, D], each head contiguous: the fastest layout for the kernels, but its
              prefixes and slots are not contiguous, so a cache cannot be bound in place

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
from onnx import TensorProto, helper

HEADS, DIM, LAYERS = 12, 64, 12


def attention_graph(layout: str):
    f = TensorProto.FLOAT
    seq_first = layout != "head-major"
    kv_shape = ["T", 1, HEADS, DIM] if seq_first else [1, HEADS, "T", DIM]
    inputs = [helper.make_tensor_value_info("q", f, [1, HEADS, 1, DIM]), helper.make_tensor_value_info("k", f, kv_shape),
              helper.make_tensor_value_info("v", f, kv_shape)]
    node = helper.make_node
    if layout == "seq-first":
        nodes = [node("Transpose", ["k"], ["kt"], perm=[1, 2, 3, 0]), node("MatMul", ["q", "kt"], ["s"]), node("Softmax", ["s"], ["p"], axis=-1),
                 node("Transpose", ["v"], ["vt"], perm=[1, 2, 0, 3]), node("MatMul", ["p", "vt"], ["o"])]
    elif layout == "seq-first-A":
        nodes = [node("Transpose", ["k"], ["ka"], perm=[1, 2, 0, 3]), node("Transpose", ["q"], ["qt"], perm=[0, 1, 3, 2]),
                 node("MatMul", ["ka", "qt"], ["st"]), node("Transpose", ["st"], ["s"], perm=[0, 1, 3, 2]), node("Softmax", ["s"], ["p"], axis=-1),
                 node("Transpose", ["p"], ["pt"], perm=[0, 1, 3, 2]), node("Transpose", ["v"], ["va"], perm=[1, 2, 3, 0]),
                 node("MatMul", ["va", "pt"], ["ot"]), node("Transpose", ["ot"], ["o"], perm=[0, 1, 3, 2])]
    else:
        nodes = [node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]), node("MatMul", ["q", "kt"], ["s"]), node("Softmax", ["s"], ["p"], axis=-1),
                 node("MatMul", ["p", "v"], ["o"])]
    graph = helper.make_graph(nodes, layout, inputs, [helper.make_tensor_value_info("o", f, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


def step_ms(session, context: int, layout: str, repeats: int) -> float:
    rng = np.random.default_rng(0)
    shape = (context, 1, HEADS, DIM) if layout != "head-major" else (1, HEADS, context, DIM)
    q = rng.random((1, HEADS, 1, DIM), np.float32)
    layers = [(rng.random(shape, np.float32), rng.random(shape, np.float32)) for _ in range(LAYERS)]
    evict = np.ones(50_000_000, np.float32)  # 200 MB, rewritten before each step

    def step():
        for k, v in layers:
            session.run(None, {"q": q, "k": k, "v": v})

    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        evict += 1
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--short", type=int, default=100)
    p.add_argument("--long", type=int, default=1500)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "attention_layouts.json")
    args = p.parse_args()
    kv_mb = 2 * LAYERS * (args.long - args.short) * HEADS * DIM * 4 / 1e6
    rows = {}
    print(f"{'layout':<12} {'short ms':>9} {'long ms':>8} {'growth ms':>10} {'GB/s':>6}   ({LAYERS} layers, contexts {args.short} and {args.long})")
    for layout in ("seq-first", "seq-first-A", "head-major"):
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(attention_graph(layout).SerializeToString(), options, providers=["CPUExecutionProvider"])
        short, long_ = step_ms(session, args.short, layout, args.repeats), step_ms(session, args.long, layout, args.repeats)
        growth = long_ - short
        rows[layout] = {"short_ms": round(short, 3), "long_ms": round(long_, 3), "growth_ms": round(growth, 3),
                        "extra_kv_gb_per_s": round(kv_mb / 1e3 / (growth / 1e3), 1)}
        print(f"{layout:<12} {short:>9.2f} {long_:>8.2f} {growth:>10.2f} {rows[layout]['extra_kv_gb_per_s']:>6.1f}")
    write_json(args.json, {"machine": machine(), "settings": vars(args) | {"json": str(args.json)}, "heads": HEADS, "head_dim": DIM,
                           "layers": LAYERS, "extra_kv_mb": round(kv_mb, 1), "layouts": rows})


if __name__ == "__main__":
    main()
