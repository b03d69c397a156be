"""`mllm-edge plan --device cpu` against `mllm-edge bench` on this machine: fit the CPU's efficiency
factors to benched bundles, and say how well they predict a model left out of the fit.

Bundles (fp32, ONNX Runtime's CPU provider): the built-in model without pruning, with FastV K=2
R=0.5 and with FasterVLM R=0.75, and two random LLaVA-1.5-shaped models (576 image tokens, a
4-layer CLIP-shaped tower): runtime_speed.py's 85 M Llama (768 wide, 12 layers) and a 200 M one
(1024 wide, 16 layers), each without pruning and with FastV; and each model's unpruned bundle
quantized for ONNX Runtime in int8 and int4 (`calibrate --target onnxruntime`, MatMulNBits: what
`export --quantize` makes). Each is benched (vision, prefill at
--prompt-tokens, decode at each of --contexts; medians of --runs); the machine's rates are measured
as `plan` measures them (devices.measure_cpu). The factors are fitted as plan_fit.py fits the GPU's
(same model, same code) on the fp32 bundles, once on every bundle (written to efficiency.json's
"cpu") and once per model with that model left out (the errors reported for predictions outside the
fit). The int8 and int4 bundles then get their own bandwidth and compute factors, the fp32 fit's
per-layer overheads held (fit_precision), likewise in the fit and with each model left out. Last,
`plan`'s own predict() is run with the written factors against every bench figure.

    .venv/bin/python benchmarks/plan_vs_bench.py          # about 20 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import plan_fit
from common import machine, work_dir, write_json  # this folder is sys.path[0] when run as a script

QUANTIZED = ("int8", "int4")  # the onnxruntime target's precisions, of each model's unpruned bundle
RANDOM_MODELS = {  # name -> (hidden, intermediate, layers, heads)
    "random 85M": (768, 2048, 12, 12),
    "random 200M": (1024, 4096, 16, 16),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--contexts", default="700,1500")
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "plan_vs_bench.json")
    p.add_argument(
        "--factors", type=Path, default=plan_fit.HERE.parent / "mllm_edge" / "planning" / "efficiency.json"
    )
    args = p.parse_args()
    contexts = tuple(int(c) for c in args.contexts.split(","))

    from mllm_edge import bench
    from mllm_edge.calibration.calibrate import CalibrateConfig, calibrate_bundle
    from mllm_edge.default_model import checkpoint
    from mllm_edge.export.bundle import ExportConfig, export_bundle
    from mllm_edge.manifest import load_manifest
    from mllm_edge.planning import costs, devices, predict
    from mllm_edge.pruning import PruningConfig
    from mllm_edge.testing.checkpoints import TinyLlavaSpec, make_tiny_llava

    with work_dir(args.work, args.keep, "plan_vs_bench") as work:
        print(f"exporting the bundles in {work} (not timed) ...", flush=True)
        sources = {"built-in": checkpoint()}
        for name, (hidden, intermediate, layers, heads) in RANDOM_MODELS.items():
            spec = TinyLlavaSpec(
                name=name.replace(" ", "_"),
                seed=0,
                image_size=336,
                patch_size=14,
                vision_hidden_size=256,
                vision_intermediate_size=1024,
                vision_layers=4,
                vision_heads=4,
                hidden_size=hidden,
                intermediate_size=intermediate,
                num_layers=layers,
                num_heads=heads,
                num_kv_heads=heads,
            )
            sources[name] = make_tiny_llava(work / name.replace(" ", "-"), spec)
        settings = [("built-in", "none", 0.0), ("built-in", "fastv", 0.5), ("built-in", "fastervlm", 0.75)]
        settings += [
            (name, method, ratio)
            for name in RANDOM_MODELS
            for method, ratio in (("none", 0.0), ("fastv", 0.5))
        ]
        bundles = []
        for model_name, method, ratio in settings:
            out = work / f"{model_name.replace(' ', '-')}-{method}.bundle"
            config = ExportConfig(
                str(sources[model_name]), out, PruningConfig.from_method(method, ratio), verify=False
            )
            export_bundle(config)
            bundles.append((model_name, out, method, ratio, "fp32"))
        for model_name in sources:
            for precision in QUANTIZED:
                source = work / f"{model_name.replace(' ', '-')}-none.bundle"
                out = work / f"{model_name.replace(' ', '-')}-none-{precision}.bundle"
                calibrate_bundle(CalibrateConfig(source, precision, "onnxruntime", out, verify=False))
                bundles.append((model_name, out, "none", 0.0, precision))

        cpu = devices.measure_cpu()
        print(
            f"this machine: {cpu.bandwidth_gb_s:.1f} GB/s (matrix x vector), {cpu.fp32_tflops * 1000:.0f} GFLOP/s fp32"
        )
        data, benched = [], []
        for model_name, out, method, ratio, precision in bundles:
            print(f"bench {model_name} {method} {precision} ...", flush=True)
            measured = bench.bench_bundle(
                out, "onnxruntime", "cpu", (args.prompt_tokens,), contexts, runs=args.runs
            )
            manifest = load_manifest(out, verify_files=False)
            model = costs.Model.from_architecture(manifest.architecture)
            setting = predict.Setting(method, ratio, precision)
            vision_keep, llm_keep = predict.keep_counts(model, setting)
            k = 2 if method == "fastv" else 0
            text_tokens = measured.prefill[0].text_tokens
            llm = costs.llm_bytes(model, precision, "fp32")
            benched.append((model_name, method, ratio, precision, model, manifest, measured))
            for d in measured.decode:
                row = {
                    "device": "cpu",
                    "model": f"{model_name} {method} {precision}",
                    "model_key": model_name,
                    "precision": precision,
                    "decode_tok_s": 1000 / d.ms_per_token.median,
                    "prefill_ms": measured.prefill[0].ms.median,
                    "vit_ms": measured.vision_ms.median,
                }
                q = {
                    "layers": model.text["num_layers"],
                    "bandwidth": cpu.bandwidth_gb_s * 1e9,
                    "peak": cpu.fp32_tflops * 1e12,
                    "decode_bytes": costs.decode_bytes(
                        model, precision, "fp32", d.context, vision_keep - llm_keep, k
                    ),
                    "prefill_flops": costs.prefill_flops(model, text_tokens, vision_keep, llm_keep, k),
                    "weight_bytes": llm["layers"] + (llm["lm_head"] or llm["embed"]),
                    "vision_flops": costs.vision_flops(model, vision_keep),
                }
                data.append((row, q))

        fp32 = [(r, q) for r, q in data if r["precision"] == "fp32"]
        fitted = plan_fit.fit(fp32)
        by_precision = {
            p: fit_precision([(r, q) for r, q in data if r["precision"] == p], fitted) for p in QUANTIZED
        }
        factors = {
            "bandwidth": {
                "fp32": round(fitted["eta_bw"], 4),
                **{p: round(f["eta_bw"], 4) for p, f in by_precision.items()},
            },
            "compute": {
                "fp32": round(fitted["eta_c"], 4),
                **{p: round(f["eta_c"], 4) for p, f in by_precision.items()},
            },
            "vision_compute": round(fitted["eta_v"], 4),
            "vision_overhead_ms": round(fitted["c_vision_ms"], 4),
            "layer_overhead_ms": round(fitted["c_decode_ms"], 5),
            "prefill_layer_overhead_ms": round(fitted["c_prefill_ms"], 5),
            "fitted_on": f"{len(bundles)} bundles benched on {machine()['cpu_count']} cores: benchmarks/plan_vs_bench.py",
            "errors": {
                "in_fit": plan_fit.summary(plan_fit.errors(fitted, fp32)),
                "model_left_out": plan_fit.summary(plan_fit.held_out(fp32, "model_key")),
                **{
                    f"{p}_{part}": plan_fit.summary(errs)
                    for p in QUANTIZED
                    for part, errs in precision_errors(
                        [(r, q) for r, q in data if r["precision"] == p], fitted
                    ).items()
                },
            },
        }
        kept = json.loads(args.factors.read_text()) if args.factors.exists() else {}
        args.factors.write_text(json.dumps({**kept, "cpu": factors}, indent=2) + "\n")
        predict.efficiency.cache_clear()

        rows = []  # plan's own predictions with the written factors, against every bench figure
        for model_name, method, ratio, precision, model, manifest, measured in benched:
            setting = predict.Setting(method, ratio, precision)
            text_tokens = measured.prefill[0].text_tokens
            first = predict.predict(model, cpu, setting, manifest.max_context, text_tokens)
            row = {
                "model": model_name,
                "method": method,
                "precision": precision,
                "vision_ms": [measured.vision_ms.median, first.vision_ms],
                "prefill_ms": [measured.prefill[0].ms.median, first.prefill_ms],
            }
            for d in measured.decode:
                plan = predict.predict(
                    model, cpu, setting, manifest.max_context, text_tokens, decode_context=d.context
                )
                row[f"decode_ms@{d.context}"] = [
                    d.ms_per_token.median,
                    round(1000 / plan.decode_tokens_per_s, 4),
                ]
            rows.append(row)
            print(
                f"{model_name:11s} {method:9s} {precision:4s} "
                + "  ".join(
                    f"{k} {v[0]:.2f} -> {v[1]:.2f} ({v[1] / v[0] - 1:+.0%})"
                    for k, v in row.items()
                    if isinstance(v, list)
                )
            )
        print("factors: " + json.dumps({k: v for k, v in factors.items() if k != "errors"}))
        for part, found in factors["errors"].items():
            print(
                f"  {part:15s} "
                + "; ".join(
                    f"{k} median {v['median_abs']:.1%} worst {v['max_abs']:.1%}" for k, v in found.items()
                )
            )
        write_json(
            args.json,
            {
                "machine": machine(),
                "cpu_measured": {"bandwidth_gb_s": cpu.bandwidth_gb_s, "fp32_tflops": cpu.fp32_tflops},
                "runs": args.runs,
                "prompt_tokens": args.prompt_tokens,
                "factors": factors,
                "plan_against_bench": rows,
                "median_abs_error_of_plan": {
                    precision: {
                        key: round(
                            statistics.median(
                                abs(r[key][1] / r[key][0] - 1) for r in rows if r["precision"] == precision
                            ),
                            4,
                        )
                        for key in rows[0]
                        if isinstance(rows[0][key], list)
                    }
                    for precision in ("fp32", *QUANTIZED)
                },
            },
        )


def fit_precision(data: list[tuple[dict, dict]], fp32: dict) -> dict:
    """A quantized precision's own bandwidth and compute factors, the fp32 fit's per-layer overheads
    held (its graphs' other operators are the same): the decode factor by least squares of the
    relative error, the compute factor over the grid plan_fit.fit searches."""
    t = np.array([1000 / float(r["decode_tok_s"]) for r, _ in data])
    a = np.array([q["decode_bytes"] / q["bandwidth"] * 1000 for _, q in data])
    c = np.array([q["layers"] * fp32["c_decode_ms"] for _, q in data])
    x = float(np.sum(a * (t - c) / t**2) / np.sum(a**2 / t**2))  # 1 / eta_bw
    eta_bw = 1 / x
    tp = np.array([float(r["prefill_ms"]) for r, _ in data])
    layers = np.array([q["layers"] for _, q in data])

    def prefill(eta_c: float) -> np.ndarray:
        return (
            np.array(
                [
                    max(
                        q["prefill_flops"] / (q["peak"] * eta_c),
                        q["weight_bytes"] / (q["bandwidth"] * eta_bw),
                    )
                    * 1000
                    for _, q in data
                ]
            )
            + layers * fp32["c_prefill_ms"]
        )

    grid = np.arange(0.02, 3.0001, 0.005)  # int8 products may beat the fp32 rate the factors are relative to
    eta_c = float(min(grid, key=lambda e: float(np.sum(((prefill(e) - tp) / tp) ** 2))))
    return {**fp32, "eta_bw": float(eta_bw), "eta_c": eta_c}


def precision_errors(data: list[tuple[dict, dict]], fp32: dict) -> dict[str, list[dict]]:
    """A quantized precision's errors in its own fit, and with each model left out of it."""
    left_out = []
    for model in sorted({r["model_key"] for r, _ in data}):
        train = [(r, q) for r, q in data if r["model_key"] != model]
        test = [(r, q) for r, q in data if r["model_key"] == model]
        left_out += plan_fit.errors(fit_precision(train, fp32), test)
    return {"in_fit": plan_fit.errors(fit_precision(data, fp32), data), "model_left_out": left_out}


if __name__ == "__main__":
    main()
