"""What pruning costs the built-in model: held-out accuracy and prefill time per setting, and a plot.

Exports the built-in default model (fp32, no verification: that is tested elsewhere) once per
setting, none; FastV K=2 with R 0.5, 0.75, 0.9; FasterVLM with R 0.5, 0.75, 0.9, 0.95; then runs
`mllm-edge eval`'s evaluation on the same --items held-out synthetic scenes for each, with the
unpruned bundle as the baseline for agreement. Prints a table, writes JSON and a PNG of accuracy
against the image tokens that reach the LLM's last layers, one line per method.

    .venv/bin/python benchmarks/pruning_accuracy.py              # about 10 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import machine, work_dir, write_json  # this folder is sys.path[0] when run as a script

SETTINGS = [
    ("none", 0.0),
    ("fastv", 0.5),
    ("fastv", 0.75),
    ("fastv", 0.9),
    ("fastervlm", 0.5),
    ("fastervlm", 0.75),
    ("fastervlm", 0.9),
    ("fastervlm", 0.95),
]


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy against image tokens kept, one line per method (the unpruned point starts both)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    none = next(r for r in rows if r["method"] == "none")
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for method, marker in (("fastv", "o"), ("fastervlm", "s")):
        points = sorted(
            [(none["image_tokens_kept"], none["accuracy"])]
            + [(r["image_tokens_kept"], r["accuracy"]) for r in rows if r["method"] == method]
        )
        ax.plot(
            [p[0] for p in points],
            [100 * p[1] for p in points],
            marker=marker,
            label=f"{method}" + (" (K=2)" if method == "fastv" else ""),
        )
    ax.set_xlabel("image tokens in the LLM's last layers (of 576)")
    ax.set_ylabel("held-out exact match (%)")
    ax.set_title("built-in model: accuracy against image tokens kept")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=500, help="held-out synthetic questions per setting")
    p.add_argument("--work", type=Path, help="bundles go here [default: a temp dir, deleted unless --keep]")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "pruning_accuracy.json")
    p.add_argument("--plot", type=Path, default=Path(__file__).parent / "results" / "pruning_accuracy.png")
    p.add_argument("--replot", action="store_true", help="only redraw the plot from --json's saved rows")
    args = p.parse_args()
    if args.replot:
        import json

        plot(json.loads(args.json.read_text())["settings"], args.plot)
        return

    from mllm_edge.default_model import checkpoint
    from mllm_edge.evaluate import evaluate, synthetic_items
    from mllm_edge.export.bundle import ExportConfig, export_bundle
    from mllm_edge.pruning import PruningConfig

    items = synthetic_items(args.items)
    rows = []
    with work_dir(args.work, args.keep, "pruning_accuracy") as work:
        bundles = {}
        for method, ratio in SETTINGS:
            name = f"{method}-{ratio}"
            print(f"exporting {name} ...", flush=True)
            bundles[name] = work / name
            export_bundle(
                ExportConfig(
                    str(checkpoint()),
                    bundles[name],
                    PruningConfig.from_method(method, ratio),
                    dtype="fp32",
                    verify=False,
                    force=True,
                )
            )
        baseline = bundles["none-0.0"]
        for method, ratio in SETTINGS:
            name = f"{method}-{ratio}"
            print(f"evaluating {name} on {len(items)} questions ...", flush=True)
            report = evaluate(
                bundles[name], items, None if name == "none-0.0" else baseline, backend="onnxruntime"
            )
            rows.append(
                {
                    "method": method,
                    "ratio": ratio,
                    "k": 2 if method == "fastv" else None,
                    "accuracy": report.accuracy,
                    "agreement": 1.0 if report.agreement is None else report.agreement,
                    "mean_prefill_ms": report.mean_prefill_ms,
                    "image_tokens_kept": report.image_tokens_kept,
                    "by_kind": report.by_kind,
                }
            )
    print(
        f"\n{'method':<10} {'R':>5} {'tokens kept':>12} {'exact match':>12} {'agrees':>7} {'prefill ms':>11}"
    )
    for r in rows:
        print(
            f"{r['method']:<10} {r['ratio']:>5} {r['image_tokens_kept']:>12} {r['accuracy']:>11.1%} {r['agreement']:>7.1%} {r['mean_prefill_ms']:>11.1f}"
        )
    write_json(args.json, {"machine": machine(), "items": args.items, "settings": rows})
    plot(rows, args.plot)


if __name__ == "__main__":
    main()
