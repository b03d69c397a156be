"""What int8 / int4 weights cost the built-in model: held-out accuracy, agreement, logits error, sizes.

Exports the built-in default model once per setting (verified, so the verification's logits error
against PyTorch's fp32 is recorded): no pruning in fp32, int8 and int4, and FastV K=2 R=0.5 and
FasterVLM R=0.75 with int8 weights. Then runs `mllm-edge eval`'s evaluation on the same --items
held-out synthetic scenes for each, with the fp32 bundle as the baseline for agreement. Decode speed
is runtime_speed.py's job (a bigger model, where the weights dominate a step).

    .venv/bin/python benchmarks/quantization.py            # a few minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import machine, work_dir, write_json  # this folder is sys.path[0] when run as a script

SETTINGS = [
    ("none", 0.0, None),
    ("none", 0.0, "int8"),
    ("none", 0.0, "int4"),
    ("fastv", 0.5, "int8"),
    ("fastervlm", 0.75, "int8"),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=300, help="held-out synthetic questions per setting")
    p.add_argument("--work", type=Path, help="bundles go here [default: a temp dir, deleted unless --keep]")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "quantization.json")
    args = p.parse_args()

    from mllm_edge.default_model import checkpoint
    from mllm_edge.evaluate import evaluate, synthetic_items
    from mllm_edge.export.bundle import ExportConfig, export_bundle
    from mllm_edge.pruning import PruningConfig

    items = synthetic_items(args.items)
    rows = []
    with work_dir(args.work, args.keep, "quantization") as work:
        bundles, reports = {}, {}
        for method, ratio, weights in SETTINGS:
            name = f"{method}-{ratio}-{weights or 'fp32'}"
            print(f"exporting {name} ...", flush=True)
            bundles[name] = work / name
            reports[name] = export_bundle(
                ExportConfig(
                    str(checkpoint()),
                    bundles[name],
                    PruningConfig.from_method(method, ratio),
                    dtype="fp32",
                    force=True,
                    quantize=weights,
                )
            )
        baseline = bundles["none-0.0-fp32"]
        for method, ratio, weights in SETTINGS:
            name = f"{method}-{ratio}-{weights or 'fp32'}"
            print(f"evaluating {name} on {len(items)} questions ...", flush=True)
            report = evaluate(
                bundles[name], items, None if name == "none-0.0-fp32" else baseline, backend="onnxruntime"
            )
            export = reports[name]
            llm_bytes = sum(size for rel, size in export.files.items() if rel.startswith("llm_"))
            rows.append(
                {
                    "method": method,
                    "ratio": ratio,
                    "weights": weights or "fp32",
                    "accuracy": report.accuracy,
                    "agreement": 1.0 if report.agreement is None else report.agreement,
                    "chain_logits_error": export.chain.max_rel,
                    "chain_tokens_identical": export.chain.reference == export.chain.onnx,
                    "llm_graph_bytes": llm_bytes,
                    "mean_prefill_ms": report.mean_prefill_ms,
                    "by_kind": report.by_kind,
                }
            )
    print(
        f"\n{'method':<10} {'R':>5} {'weights':>7} {'exact match':>12} {'agrees':>7} {'logits err':>11} {'LLM MB':>7} {'prefill ms':>11}"
    )
    for r in rows:
        print(
            f"{r['method']:<10} {r['ratio']:>5} {r['weights']:>7} {r['accuracy']:>11.1%} {r['agreement']:>7.1%} "
            f"{r['chain_logits_error']:>11.2e} {r['llm_graph_bytes'] / 1e6:>7.2f} {r['mean_prefill_ms']:>11.1f}"
        )
    write_json(args.json, {"machine": machine(), "items": args.items, "settings": rows})


if __name__ == "__main__":
    main()
