"""The runtime's peak memory on a ~1B model against the weights it runs (target: at most 1.2x the
weights plus the KV cache), and what ONNX Runtime does with them.

export_memory.py's random LLaVA (CLIP-L/336 tower, a 0.7B Llama with GQA, about 1 B parameters) is
built and exported in fp32 with FastV K=2 R=0.5 (--no-verify; neither timed), then `bench` runs it in
a fresh child per setting (vision, a prefill of the picture and 32 text tokens, 16 decode steps at
700 positions, 2 runs), its peak RSS taken by os.wait4 and sampled per stage as export_memory.py
does:
  with arena   the default sessions with ONNX Runtime's CPU memory arena on (the runtime's before)
  default      the runtime's optimised ONNX Runtime sessions, no arena (what `run` and `serve` open)
  low memory   unoptimised sessions over the mapped weight files (Pipeline.load(low_memory=True))
Weights are the bundle's data files; the KV cache is the keys and values at 700 positions (the
preallocated rest is never touched, so never resident).

    .venv/bin/python benchmarks/runtime_memory.py          # about 15 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import GB, machine, work_dir, write_json  # this folder is sys.path[0] when run as a script
from export_memory import SIZES, measure, size_args

BENCH = """
import json, sys
import onnxruntime as ort
if sys.argv[2] == "arena":  # the runtime's sessions as they were before: with ONNX Runtime's CPU arena
    session = ort.InferenceSession
    def with_arena(path, options=None, **kwargs):
        options.enable_cpu_mem_arena = True
        return session(path, options, **kwargs)
    ort.InferenceSession = with_arena
from mllm_edge.bench import bench_bundle
r = bench_bundle(sys.argv[1], "onnxruntime", "cpu", (32,), (700,), runs=2, warmup=0, low_memory=sys.argv[2] == "1")
print(json.dumps(r.to_dict()))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "runtime_memory.json")
    for opt, (_, default) in SIZES.items():
        p.add_argument("--" + opt.replace("_", "-"), type=int, default=default)
    args = p.parse_args()
    here = Path(__file__).parent

    from mllm_edge.manifest import load_manifest
    from mllm_edge.planning import costs

    with work_dir(args.work, args.keep, "runtime_memory") as work:
        folder, bundle = work / "checkpoint", work / "bundle"
        print(f"building the checkpoint in {folder} and exporting it (not timed) ...", flush=True)
        built = subprocess.run(
            [sys.executable, str(here / "export_memory.py"), "--_build", str(folder), "--dtype", "fp32"]
            + size_args(args),
            check=True,
            stdout=subprocess.PIPE,
            text=True,
        )
        params = json.loads(built.stdout.strip().splitlines()[-1])["params"]
        subprocess.run(
            [sys.executable, "-m", "mllm_edge.cli", "export", "--model", str(folder), "--out", str(bundle)]
            + ["--method", "fastv", "--ratio", "0.5", "--no-verify", "--force"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        manifest = load_manifest(bundle, verify_files=False)
        weights = sum(f.stat().st_size for f in bundle.glob("*.onnx.data"))
        model = costs.Model.from_architecture(manifest.architecture)
        kv = costs.kv_bytes(model, 700, 288, 2, "fp32")
        rows = {}
        modes = (("with arena", "arena"), ("default", "0"), ("low memory", "1"))
        for name, low in modes:
            print(f"bench ({name}) ...", flush=True)
            got = measure(name, [sys.executable, "-c", BENCH, str(bundle), low], work / f"{name}.log")
            bench = json.loads(
                (work / f"{name}.log")
                .read_text()
                .split("--- stdout\n")[1]
                .split("\n--- stderr")[0]
                .strip()
                .splitlines()[-1]
            )
            got["over_weights_plus_kv"] = round(got["peak_rss_gb"] * GB / (weights + kv), 3)
            got["decode_ms_per_token"] = bench["decode"][0]["ms_per_token"]["median"]
            got["prefill_ms"] = bench["prefill"][0]["ms"]["median"]
            rows[name] = got
            print(
                f"  {name}: peak RSS {got['peak_rss_gb']:.2f} GB = {got['over_weights_plus_kv']:.2f}x the weights "
                f"({weights / GB:.2f} GB) + KV ({kv / GB:.3f} GB); decode {got['decode_ms_per_token']:.0f} ms/token, "
                f"prefill {got['prefill_ms']:.0f} ms"
            )
        write_json(
            args.json,
            {
                "machine": machine(),
                "params": params,
                "weights_gb": round(weights / GB, 3),
                "kv_cache_gb": round(kv / GB, 4),
                "runs": rows,
            },
        )


if __name__ == "__main__":
    main()
