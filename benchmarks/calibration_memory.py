"""How long `mllm-edge calibrate` takes on a ~1B model, its peak memory against the largest graph's
weights (target <= 2.5x), and what int4-awq leaves of the LLM graphs' bytes (target <= 35% of fp16's).

The random LLaVA of export_memory.py (CLIP-L/336 tower, 0.7B Llama with GQA) is built in a child
process and exported without verification (not measured here: export_memory.py does that); then
`mllm-edge calibrate` runs in a fresh child on a JSONL of synthetic scenes, measured as export_memory
measures an export (ru_maxrss of the child, VmRSS sampled per stage). --no-verify by default: a
random model's answers are near-ties that any quantization flips, so the answers check says nothing.

    .venv/bin/python benchmarks/calibration_memory.py --precision int4-awq --samples 16
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

from common import GB, machine, work_dir, write_json  # this folder is sys.path[0] when run as a script
from export_memory import SIZES, measure, size_args


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp16")
    p.add_argument("--precision", default="int4-awq")
    p.add_argument("--samples", type=int, default=16, help="calibration items")
    p.add_argument("--verify", action="store_true", help="keep calibrate's held-out checks on")
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "calibration_memory.json")
    for opt, (_, default) in SIZES.items():
        p.add_argument("--" + opt.replace("_", "-"), type=int, default=default)
    args = p.parse_args()
    here = Path(__file__).parent

    with work_dir(args.work, args.keep, "calibration_memory") as work:
        folder, bundle = work / "checkpoint", work / "bundle"
        print(f"building the checkpoint in {folder} and exporting it (not timed) ...", flush=True)
        built = subprocess.run(
            [sys.executable, str(here / "export_memory.py"), "--_build", str(folder), "--dtype", args.dtype]
            + size_args(args),
            check=True,
            stdout=subprocess.PIPE,
            text=True,
        )
        params = json.loads(built.stdout.strip().splitlines()[-1])["params"]
        cli = [sys.executable, "-m", "mllm_edge.cli"]
        subprocess.run(
            cli
            + ["export", "--model", str(folder), "--out", str(bundle), "--method", "fastv", "--ratio", "0.5"]
            + ["--dtype", args.dtype, "--no-verify", "--force"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        data = work / "data"
        data.mkdir(exist_ok=True)
        from mllm_edge.default_model.scenes import sample

        rng, lines = random.Random(0), []
        for i in range(args.samples + (4 if args.verify else 0)):
            scene, question = sample(rng)
            scene.render().save(data / f"{i}.png")
            lines.append(json.dumps({"image": f"{i}.png", "question": question.text}))
        (data / "cal.jsonl").write_text("\n".join(lines) + "\n")

        out = work / f"bundle-{args.precision}"
        cmd = cli + [
            "calibrate",
            str(bundle),
            "--precision",
            args.precision,
            "--dataset",
            str(data / "cal.jsonl"),
        ]
        cmd += ["--samples", str(args.samples), "--out", str(out), "--force"] + (
            [] if args.verify else ["--no-verify"]
        )
        print(f"calibrate {args.precision} on {args.samples} items ...", flush=True)
        r = measure(args.precision, cmd, work / "calibrate.log")

        def data_bytes(b: Path, graph: str) -> int:
            return sum(f.stat().st_size for f in b.glob(f"{graph}.onnx*"))

        graphs = ("vision", "embed", "llm_head", "prune", "llm_tail")
        largest = max(data_bytes(bundle, g) for g in graphs)
        llm_before = sum(data_bytes(bundle, g) for g in ("llm_head", "llm_tail"))
        llm_after = sum(data_bytes(out, g) for g in ("llm_head", "llm_tail"))
        r.update(
            params=params,
            largest_graph_gb=round(largest / GB, 3),
            peak_over_largest_graph=round(r["peak_rss_gb"] * GB / largest, 2),
            llm_graph_gb_before=round(llm_before / GB, 3),
            llm_graph_gb_after=round(llm_after / GB, 3),
            llm_bytes_ratio=round(llm_after / llm_before, 3),
        )
        print(
            f"{params / 1e9:.2f} B params, {args.dtype}; calibrate {args.precision}: {r['wall_s']:.0f} s, "
            f"peak RSS {r['peak_rss_gb']:.2f} GB = {r['peak_over_largest_graph']:.2f}x the largest graph "
            f"({r['largest_graph_gb']:.2f} GB; target <= 2.5x; sampled peak in '{r['sampled_peak_stage']}'); "
            f"LLM graphs {r['llm_graph_gb_before']:.2f} -> {r['llm_graph_gb_after']:.2f} GB "
            f"({100 * r['llm_bytes_ratio']:.0f}%; target <= 35% of fp16)"
        )
        write_json(args.json, {"machine": machine(), "dtype": args.dtype, "samples": args.samples, "run": r})


if __name__ == "__main__":
    main()
