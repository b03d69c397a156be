"""What calibration costs the built-in model: held-out accuracy, agreement with fp32, LLM graph bytes,
ONNX Runtime CPU prefill time and decode speed, for precision x pruning.

Precisions: the fp32 source, int8, int4-awq and fp8 (tensorrt target: Q/DQ graphs run by ONNX
Runtime on CPU, unfused, so their CPU speed says nothing of TensorRT's) and the onnxruntime target's
int8 / int4 (MatMulNBits). Pruning: none, FastV K=2 R=0.5, FasterVLM R=0.75. Each calibrated on the
default 32 synthetic items (seed 0); evaluated on --items held-out questions (eval's seed) with the
same pruning's fp32 bundle as the baseline.

    .venv/bin/python benchmarks/calibration.py --items 300      # tens of minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from common import machine, work_dir, write_json  # this folder is sys.path[0] when run as a script

PRUNING = [("none", 0.0), ("fastv", 0.5), ("fastervlm", 0.75)]
PRECISIONS = [
    (None, None),
    ("int8", "tensorrt"),
    ("int4-awq", "tensorrt"),
    ("fp8", "tensorrt"),
    ("int8", "onnxruntime"),
    ("int4", "onnxruntime"),
]


def decode_speed(bundle: Path, items, runs: int = 5) -> tuple[float, float]:
    """Median prefill ms and decode tokens/s over the first `runs` items (16 new tokens each)."""
    from mllm_edge.runtime.pipeline import Pipeline

    prefill, speed = [], []
    with Pipeline.load(bundle, backend="onnxruntime") as pipeline:
        for item in items[:runs]:
            r = pipeline.generate(item.image, item.question, max_new_tokens=16)
            prefill.append(r.timings_ms["prefill"])
            if r.decode_tokens_per_s:
                speed.append(r.decode_tokens_per_s)
    return statistics.median(prefill), statistics.median(speed) if speed else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=300, help="held-out synthetic questions per setting")
    p.add_argument("--work", type=Path, help="bundles go here [default: a temp dir, deleted unless --keep]")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "calibration.json")
    args = p.parse_args()

    from mllm_edge.calibration.calibrate import CalibrateConfig, calibrate_bundle
    from mllm_edge.default_model import checkpoint
    from mllm_edge.evaluate import evaluate, synthetic_items
    from mllm_edge.export.bundle import ExportConfig, export_bundle
    from mllm_edge.export.report import bundle_sizes
    from mllm_edge.manifest import load_manifest
    from mllm_edge.pruning import PruningConfig

    items = synthetic_items(args.items)
    rows = []
    with work_dir(args.work, args.keep, "mllm-edge-calibration") as work:
        for method, ratio in PRUNING:
            source = work / f"{method}-fp32"
            export_bundle(
                ExportConfig(str(checkpoint()), source, PruningConfig.from_method(method, ratio), force=True)
            )
            for precision, target in PRECISIONS:
                bundle = source
                if precision is not None:
                    bundle = work / f"{method}-{target}-{precision}"
                    print(f"calibrating {bundle.name} ...", flush=True)
                    calibrate_bundle(CalibrateConfig(source, precision, target, bundle, force=True))
                print(f"evaluating {bundle.name} on {len(items)} questions ...", flush=True)
                report = evaluate(bundle, items, None if bundle == source else source, backend="onnxruntime")
                m = load_manifest(bundle)
                sizes = bundle_sizes(bundle, m)
                llm = sum(size for rel, size in sizes.items() if rel.startswith("llm_"))
                prefill_ms, tokens_per_s = decode_speed(bundle, items)
                rows.append(
                    {
                        "pruning": method,
                        "ratio": ratio,
                        "precision": precision or "fp32",
                        "target": target or "-",
                        "accuracy": report.accuracy,
                        "agreement_with_fp32": report.agreement,
                        "llm_graph_bytes": llm,
                        "prefill_ms_median": prefill_ms,
                        "decode_tokens_per_s_median": tokens_per_s,
                    }
                )
    print(
        f"{'pruning':<10} {'precision':<9} {'target':<11} {'acc':>6} {'agree':>6} {'LLM MB':>7} {'prefill ms':>10} {'tok/s':>7}"
    )
    for r in rows:
        agree = "-" if r["agreement_with_fp32"] is None else f"{100 * r['agreement_with_fp32']:.1f}"
        print(
            f"{r['pruning']:<10} {r['precision']:<9} {r['target']:<11} {100 * r['accuracy']:>6.1f} {agree:>6} "
            f"{r['llm_graph_bytes'] / 1e6:>7.2f} {r['prefill_ms_median']:>10.1f} {r['decode_tokens_per_s_median']:>7.1f}"
        )
    write_json(args.json, {"machine": machine(), "items": args.items, "rows": rows})


if __name__ == "__main__":
    main()
