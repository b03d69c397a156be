"""The fastest an fp32 decode step can be on this machine: reading the weights once, nothing else.

A decode step multiplies one token by every weight matrix of the language model and its LM head, so
it reads all of them once; on a CPU that is memory-bound. This script times exactly that and
nothing more — the checkpoint's own LLM weight matrices (language model and LM head, the input
embeddings left out), each multiplied by one row, back to back, in ONNX Runtime (one graph of
`Gemm(transB=1)` nodes, as our bundles hold them) and in PyTorch (`F.linear`) — and, side by side
with it (benchmarks/runtime_speed.py's engines, taking turns), our runtime and transformers'
generate on the same model (runtime_speed.py's default sizes: an 85 M-parameter Llama, 576 image
tokens). transformers' decode ms/token divided by the faster weights-only step bounds the decode
speed-up any fp32 implementation can reach over it here; a step must also read the cached keys and
values (at the decode's mean context), and adding those bytes at the same speed gives a tighter
bound, still before norms, softmax and sampling.

    .venv/bin/python benchmarks/decode_floor.py      # about 5 minutes on 2 cores; JSON in benchmarks/results/

Same size options as runtime_speed.py. Needs the export extra and onnxruntime.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from common import machine, work_dir, write_json  # this folder is sys.path[0] when run as a script
from runtime_speed import PROMPT, HfRun, RuntimeRun, add_size_options, med, side_by_side, spec_sizes


def llm_weights(folder: Path) -> list[np.ndarray]:
    """The 2-D weights a decode step multiplies by, [out, in] as stored: language model and LM head."""
    from safetensors.numpy import load_file

    weights = []
    for file in sorted(folder.glob("*.safetensors")):
        tensors = load_file(file)
        weights += [
            t
            for k, t in sorted(tensors.items())
            if ("language_model" in k or "lm_head" in k) and "embed_tokens" not in k and t.ndim == 2
        ]
    return weights


class WeightsOnlyRun:
    """`steps` back-to-back decode steps that only multiply one row by every weight; once() -> ms per step."""

    def __init__(self, weights: list[np.ndarray], engine: str, steps: int):
        self.steps, self.engine = steps, engine
        rows = {w.shape[1]: np.random.default_rng(0).random((1, w.shape[1]), np.float32) for w in weights}
        if engine == "onnxruntime":
            import onnxruntime as ort
            from gemv_layouts import graph  # the same Gemm(transB=1) graph as our bundles hold

            options = ort.SessionOptions()
            options.add_session_config_entry(
                "session.intra_op.allow_spinning", "0"
            )  # as the runtime's sessions
            session = ort.InferenceSession(
                graph("ort-gemm", weights), options, providers=["CPUExecutionProvider"]
            )
            feeds = {f"x{n}": x for n, x in rows.items()}
            self.step = lambda: session.run(None, feeds)
        else:
            import torch

            pairs = [(torch.from_numpy(rows[w.shape[1]]), torch.from_numpy(w)) for w in weights]

            def step():
                with torch.inference_mode():
                    for x, w in pairs:
                        torch.nn.functional.linear(x, w)

            self.step = step

    def once(self) -> dict:
        start = time.perf_counter()
        for _ in range(self.steps):
            self.step()
        return {"decode_per_token": (time.perf_counter() - start) * 1000 / self.steps}

    @staticmethod
    def summary(runs: list[dict]) -> dict:
        per_step = med([r["decode_per_token"] for r in runs])
        return {"decode_per_token": round(per_step, 3), "decode_tokens_per_s": round(1000 / per_step, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--work", type=Path, help="checkpoint and bundle go here [default: a temp dir, deleted unless --keep]"
    )
    p.add_argument("--keep", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=128,
        help="tokens per generate run, and steps per weights-only run",
    )
    p.add_argument("--init-range", type=float, default=0.02)
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "decode_floor.json")
    add_size_options(p)
    args = p.parse_args()
    if args.max_new_tokens < 2 or args.repeats < 1:
        p.error("--max-new-tokens must be >= 2 and --repeats >= 1")

    import torch

    from mllm_edge.export.bundle import ExportConfig, export_bundle
    from mllm_edge.pruning import PruningConfig
    from mllm_edge.testing.checkpoints import TinyLlavaSpec, make_tiny_llava, sample_image

    sizes = spec_sizes(args)
    n = args.max_new_tokens
    with work_dir(args.work, args.keep, "decode_floor") as work:
        print(f"building the checkpoint and bundle in {work} (not timed) ...", flush=True)
        folder = make_tiny_llava(
            work / "checkpoint",
            TinyLlavaSpec(name="bench_speed", initializer_range=args.init_range, seed=0, **sizes),
        )
        bundle = work / "bundle-none"
        export_bundle(
            ExportConfig(str(folder), bundle, PruningConfig(), dtype="fp32", verify=False, force=True)
        )
        weights = llm_weights(folder)
        weight_mb = sum(w.nbytes for w in weights) / 1e6
        image = sample_image(640, 480, seed=0)
        print(
            f"{len(weights)} weight matrices, {weight_mb:.1f} MB; torch threads {torch.get_num_threads()}",
            flush=True,
        )
        rows = side_by_side(
            {
                "weights only, ONNX Runtime Gemm": WeightsOnlyRun(weights, "onnxruntime", n),
                "weights only, PyTorch F.linear": WeightsOnlyRun(weights, "torch", n),
                "runtime (onnxruntime)": RuntimeRun(bundle, image, PROMPT, n),
                "transformers (sdpa)": HfRun(folder, image, PROMPT, n, "sdpa"),
            },
            args.repeats,
        )
        hf = rows["transformers (sdpa)"]["decode_per_token"]
        floor = min(rows[k]["decode_per_token"] for k in rows if k.startswith("weights only"))
        context = rows["runtime (onnxruntime)"]["prompt_tokens"] + n / 2  # mean over the decode
        kv_mb = 2 * args.layers * context * args.kv_heads * (args.hidden // args.heads) * 4 / 1e6
        with_cache = floor * (1 + kv_mb / weight_mb)  # the cache read as fast as the weights

        print(
            f"\ndecode ms per token or step ({n} per run, median of {args.repeats}; {weight_mb:.0f} MB of weights)"
        )
        print(f"{'engine':<34} {'ms':>8} {'weights GB/s':>13} {'x transformers':>15}")
        for name, r in rows.items():
            r.pop("token_ids", None)
            r["weights_gb_per_s"] = round(weight_mb / r["decode_per_token"], 1)
            r["speedup_vs_transformers"] = round(hf / r["decode_per_token"], 3)
            print(
                f"{name:<34} {r['decode_per_token']:>8.2f} {r['weights_gb_per_s']:>13.1f} {r['speedup_vs_transformers']:>14.2f}x"
            )
        print(
            f"{'weights + KV cache (derived)':<34} {with_cache:>8.2f} {'':>13} {hf / with_cache:>14.2f}x   "
            f"({kv_mb:.0f} MB of keys and values at a mean context of {context:.0f}, read as fast as the weights)"
        )
        print(
            f"bound: no fp32 decode here can beat transformers by more than {hf / floor:.2f}x (reading the weights alone), "
            f"{hf / with_cache:.2f}x (weights and cache)"
        )
        write_json(
            args.json,
            {
                "machine": {**machine(), "torch_threads": torch.get_num_threads()},
                "settings": {
                    k: str(v) if isinstance(v, Path) else v
                    for k, v in vars(args).items()
                    if k not in ("work", "keep", "json")
                },
                "weight_matrices": len(weights),
                "weight_mb": round(weight_mb, 1),
                "rows": rows,
                "floor_ms": floor,
                "max_speedup_vs_transformers": round(hf / floor, 3),
                "mean_context": context,
                "kv_cache_mb": round(kv_mb, 1),
                "floor_with_cache_ms": round(with_cache, 3),
                "max_speedup_with_cache_vs_transformers": round(hf / with_cache, 3),
            },
        )


if __name__ == "__main__":
    main()
