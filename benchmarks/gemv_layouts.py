"""One fp32 decode step's weight reads, by library and layout: how close a CPU gets to its memory bound.

A decode step multiplies one row by every weight matrix of the LLM, so on a CPU its time is the time
to stream those bytes. This script streams the matrices of a Llama of the given shape (by default
vs_llamacpp.py's ~0.5B model: 24 layers of 1024 and 4096, a 32064-token head, 1.74 GB, larger than
any CPU cache) in six ways, taking turns, and prints each one's median time and GB/s:

  ort-gemm        ONNX Runtime Gemm(x, W, transB=1), W [out, in]: what our bundles hold
  ort-matmul      ONNX Runtime MatMul(x, W^T), the weights stored transposed
  ort-gemm-left   ONNX Runtime Gemm(W, x, transB=1), the weight as the left operand, then a Transpose
                  (ONNX Runtime's GemmTransposeFusion, which would fold the pair back into the
                  first form, is turned off for this session)
  ort-gemm-unpacked, ort-matmul-unpacked
                  the first two with prepacking off (session.disable_prepacking): MLAS then reads
                  the weights as stored instead of its packed copy (for one row, most likely
                  through its M=1 kernels, SgemmKernelM1Avx; not traced)
  numpy           numpy's W @ x (its BLAS's sgemv: OpenBLAS in numpy's wheels)

If all of them read at about one speed, the step is bound by memory, not by a kernel, and no layout
or library would decode faster with the same bytes (docs/performance.md, "Against llama.cpp").
Set OPENBLAS_NUM_THREADS to --threads for a like-for-like numpy row. Each step runs after a pause:
an earlier version without it measured ort-gemm, which runs right after numpy in most rounds,
20-60% slower; with the pause it reads as fast as ort-matmul. Most likely (not traced) OpenBLAS's
threads, which spin for a while after a product, took a core from whatever came next.

    .venv/bin/python benchmarks/gemv_layouts.py     # about 3 minutes on 2 cores, up to 17 GB of RAM
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from common import machine, write_json  # this folder is sys.path[0] when run as a script
from onnx import TensorProto, helper, numpy_helper

LAYOUTS = (
    "ort-gemm",
    "ort-matmul",
    "ort-gemm-left",
    "ort-gemm-unpacked",
    "ort-matmul-unpacked",
    "numpy",
)
PAUSE_S = 0.5  # before each timed step: lets the previous library's threads go idle


def llama_matrices(layers: int, hidden: int, intermediate: int, vocab: int) -> list[np.ndarray]:
    """[out, in] matrices a decode step reads: q, k, v, o, gate, up, down per layer, then the LM head."""
    shapes = [(hidden, hidden)] * 4 + [(intermediate, hidden)] * 2 + [(hidden, intermediate)]
    rng = np.random.default_rng(0)
    return [rng.standard_normal(s, dtype=np.float32) * 0.02 for s in shapes * layers + [(vocab, hidden)]]


def graph(layout: str, weights: list[np.ndarray]) -> bytes:
    """One ONNX graph multiplying the row input x{in} by every weight, in the given layout."""
    nodes, inits = [], []
    for i, w in enumerate(weights):
        x, y = f"x{w.shape[1]}", f"y{i}"
        if layout in ("ort-gemm", "ort-gemm-unpacked"):
            nodes.append(helper.make_node("Gemm", [x, f"w{i}"], [y], transB=1))
            inits.append(numpy_helper.from_array(w, f"w{i}"))
        elif layout in ("ort-matmul", "ort-matmul-unpacked"):
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [y]))
            inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), f"w{i}"))
        else:  # ort-gemm-left: W x^T is [out, 1]; transposed back to the row the others give
            nodes.append(helper.make_node("Gemm", [f"w{i}", x], [f"t{i}"], transB=1))
            nodes.append(helper.make_node("Transpose", [f"t{i}"], [y]))
            inits.append(numpy_helper.from_array(w, f"w{i}"))
    sizes = sorted({w.shape[1] for w in weights})
    g = helper.make_graph(
        nodes,
        layout,
        [helper.make_tensor_value_info(f"x{n}", TensorProto.FLOAT, [1, n]) for n in sizes],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(len(weights))],
        inits,
    )
    return helper.make_model(
        g, opset_imports=[helper.make_opsetid("", 20)], ir_version=10
    ).SerializeToString()


def step_functions(weights: list[np.ndarray], threads: int) -> dict:
    """layout -> a function doing one step's reads and returning its outputs (checked against numpy's)."""
    rows = {n: np.random.default_rng(1).random((1, n), np.float32) for n in {w.shape[1] for w in weights}}
    steps = {}
    for layout in LAYOUTS[:-1]:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the runtime's
        if layout.endswith("-unpacked"):
            options.add_session_config_entry("session.disable_prepacking", "1")
        kept = {"disabled_optimizers": ["GemmTransposeFusion"]} if layout == "ort-gemm-left" else {}
        session = ort.InferenceSession(
            graph(layout, weights), options, providers=["CPUExecutionProvider"], **kept
        )
        feeds = {f"x{n}": x for n, x in rows.items()}
        steps[layout] = lambda session=session, feeds=feeds: session.run(None, feeds)
    steps["numpy"] = lambda: [w @ rows[w.shape[1]][0] for w in weights]
    expected = steps["numpy"]()
    for layout in LAYOUTS[:-1]:
        for got, want in zip(steps[layout](), expected):
            np.testing.assert_allclose(got.reshape(-1), want, rtol=1e-3, atol=1e-4, err_msg=layout)
    return steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32064)
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime's intra-op threads")
    p.add_argument("--rounds", type=int, default=15, help="timed rounds, the layouts taking turns in each")
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "gemv_layouts.json")
    args = p.parse_args()
    if min(args.layers, args.hidden, args.intermediate, args.vocab, args.threads, args.rounds) < 1:
        p.error("sizes, --threads and --rounds must be >= 1")

    weights = llama_matrices(args.layers, args.hidden, args.intermediate, args.vocab)
    nbytes = sum(w.nbytes for w in weights)
    print(f"{len(weights)} matrices, {nbytes / 1e9:.2f} GB; building the sessions ...", flush=True)
    steps = step_functions(weights, args.threads)
    times = {layout: [] for layout in LAYOUTS}
    for r in range(args.rounds):
        for layout in LAYOUTS[r % len(LAYOUTS) :] + LAYOUTS[: r % len(LAYOUTS)]:  # each leads in turn
            time.sleep(PAUSE_S)
            start = time.perf_counter()
            steps[layout]()
            times[layout].append((time.perf_counter() - start) * 1000)

    rows = {}
    print(f"{'layout':15s} {'ms (min-max)':>22s} {'GB/s':>6s}")
    for layout, ms in times.items():
        median = statistics.median(ms)
        rows[layout] = {
            "ms": {"median": round(median, 2), "min": round(min(ms), 2), "max": round(max(ms), 2)},
            "gb_per_s": round(nbytes / median / 1e6, 2),
        }
        spread = f"{median:.1f} ({min(ms):.1f}-{max(ms):.1f})"
        print(f"{layout:15s} {spread:>22s} {rows[layout]['gb_per_s']:6.1f}")
    write_json(
        args.json,
        {
            "machine": machine(),
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
            "bytes": nbytes,
            "layouts": rows,
        },
    )


if __name__ == "__main__":
    main()
