"""`mllm-edge plan --device cpu` against `mllm-edge bench` on this machine: fit the CPU's efficiency
factors to benched bundles, and say how well they predict a model left out of the fit.

Bundles (fp32, ONNX Runtime's CPU provider): the built-in model without pruning, with FastV K=2
R=0.5 and with FasterVLM R=0.75, and two random LLaVA-1.5-shaped models (576 image tokens, a
4-layer CLIP-shaped tower): runtime_speed.py's 85 M Llama (768 wide, 12 layers) and a 200 M one
(1024 wide, 16 layers), each without pruning and with FastV. Each is benched (vision, prefill at
--prompt-tokens, decode at each of --contexts; medians of --runs); the machine's rates are measured
as `plan` measures them (devices.measure_cpu). The factors are fitted as plan_fit.py fits the GPU's
(same model, same code), once on every bundle (written to efficiency.json's "cpu") and once per
model with that model left out (the errors reported for predictions outside the fit). Last,
`plan`'s own predict() is run with the written factors against every bench figure.

    .venv/bin/python benchmarks/plan_vs_bench.py          # about 10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import plan_fit
from common import machine, work_dir, write_json  # this folder is sys.path[0] when run as a script

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
            bundles.append((model_name, out, method, ratio))

        cpu = devices.measure_cpu()
        print(
            f"this machine: {cpu.bandwidth_gb_s:.1f} GB/s (matrix x vector), {cpu.fp32_tflops * 1000:.0f} GFLOP/s fp32"
        )
        data, benched = [], []
        for model_name, out, method, ratio in bundles:
            print(f"bench {model_name} {method} ...", flush=True)
            measured = bench.bench_bundle(
                out, "onnxruntime", "cpu", (args.prompt_tokens,), contexts, runs=args.runs
            )
            manifest = load_manifest(out, verify_files=False)
            model = costs.Model.from_architecture(manifest.architecture)
            setting = predict.Setting(method, ratio, "fp32")
            vision_keep, llm_keep = predict.keep_counts(model, setting)
            k = 2 if method == "fastv" else 0
            text_tokens = measured.prefill[0].text_tokens
            llm = costs.llm_bytes(model, "fp32", "fp32")
            benched.append((model_name, method, ratio, model, manifest, measured))
            for d in measured.decode:
                row = {
                    "device": "cpu",
                    "model": f"{model_name} {method}",
                    "model_key": model_name,
                    "decode_tok_s": 1000 / d.ms_per_token.median,
                    "prefill_ms": measured.prefill[0].ms.median,
                    "vit_ms": measured.vision_ms.median,
                }
                q = {
                    "layers": model.text["num_layers"],
                    "bandwidth": cpu.bandwidth_gb_s * 1e9,
                    "peak": cpu.fp32_tflops * 1e12,
                    "decode_bytes": costs.decode_bytes(
                        model, "fp32", "fp32", d.context, vision_keep - llm_keep, k
                    ),
                    "prefill_flops": costs.prefill_flops(model, text_tokens, vision_keep, llm_keep, k),
                    "weight_bytes": llm["layers"] + (llm["lm_head"] or llm["embed"]),
                    "vision_flops": costs.vision_flops(model, vision_keep),
                }
                data.append((row, q))

        fitted = plan_fit.fit(data)
        factors = {
            "bandwidth": {"fp32": round(fitted["eta_bw"], 4)},
            "compute": {"fp32": round(fitted["eta_c"], 4)},
            "vision_compute": round(fitted["eta_v"], 4),
            "vision_overhead_ms": round(fitted["c_vision_ms"], 4),
            "layer_overhead_ms": round(fitted["c_decode_ms"], 5),
            "prefill_layer_overhead_ms": round(fitted["c_prefill_ms"], 5),
            "fitted_on": f"{len(bundles)} bundles benched on {machine()['cpu_count']} cores: benchmarks/plan_vs_bench.py",
            "errors": {
                "in_fit": plan_fit.summary(plan_fit.errors(fitted, data)),
                "model_left_out": plan_fit.summary(plan_fit.held_out(data, "model_key")),
            },
        }
        kept = json.loads(args.factors.read_text()) if args.factors.exists() else {}
        args.factors.write_text(json.dumps({**kept, "cpu": factors}, indent=2) + "\n")
        predict.efficiency.cache_clear()

        rows = []  # plan's own predictions with the written factors, against every bench figure
        for model_name, method, ratio, model, manifest, measured in benched:
            setting = predict.Setting(method, ratio, "fp32")
            text_tokens = measured.prefill[0].text_tokens
            first = predict.predict(model, cpu, setting, manifest.max_context, text_tokens)
            row = {
                "model": model_name,
                "method": method,
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
                f"{model_name:11s} {method:9s} "
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
                    key: round(statistics.median(abs(r[key][1] / r[key][0] - 1) for r in rows), 4)
                    for key in rows[0]
                    if isinstance(rows[0][key], list)
                },
            },
        )


if __name__ == "__main__":
    main()
