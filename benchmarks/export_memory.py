"""How long `mllm-edge export` takes, and its peak memory against the size of the weights.

A random LLaVA of about 1B parameters (by default a CLIP-L/336 vision tower and a 0.7B Llama with
grouped-query attention) is written once with `mllm_edge.testing.checkpoints.make_tiny_llava`, its
weights re-saved in the export dtype (fp16 by default), and then exported twice with the CLI, each in
a fresh child process: with verification (the CLI's default) and with --no-verify.

Per run it reports the wall time and the export's peak resident set size (RSS): ru_maxrss of exactly
that child, from os.wait4 on its pid. The checkpoint is built in a separate child, so this process
stays small (~20 MB): a child spawned from a big parent would inherit its high-water mark at exec.
The target is a peak RSS of at most 2x the weights' size on disk (sum of *.safetensors). A thread
also samples the child's VmRSS (and RssAnon / RssFile: mapped weights count as RSS) every 0.5 s and,
since the CLI's progress bar is made visible in the pipe (TTY_COMPATIBLE=1), names the stage where
the sampled peak was.

    .venv/bin/python benchmarks/export_memory.py                      # ~1B, fp16, fastv 0.5
    .venv/bin/python benchmarks/export_memory.py --no-verify --layers 12 --work /tmp/bench --keep
    .venv/bin/python benchmarks/export_memory.py --dtype fp32 --quantize int8 --json benchmarks/results/export_memory_int8.json
    .venv/bin/python benchmarks/export_memory.py --next --json benchmarks/results/export_memory_next.json  # LLaVA-NeXT
    .venv/bin/python benchmarks/export_memory.py --next-7b --verify-only --json benchmarks/results/export_memory_next_7b.json
        # LLaVA-NeXT-7B's shape (7.06 B parameters, 14.1 GB in fp16; ~15 minutes, 28 GB of disk)

Results go to benchmarks/results/export_memory.json (--json). Needs the export extra and
onnxruntime; on 2 CPU cores the default model takes ~10-25 minutes. The checkpoint is written in
the export dtype from the start and in 2 GB shards, so a 7B one is made within 24 GB of memory.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import GB, machine, work_dir, write_json  # this folder is sys.path[0] when run as a script

STAGES = [  # export's, then calibrate's (benchmarks/calibration_memory.py)
    "record held-out",
    "verify answers",
    "verify llm_head",
    "verify llm_tail",
    "verify vision",
    "capture llm_head",
    "capture llm_tail",
    "capture vision",
    "quantize llm_head",
    "quantize llm_tail",
    "quantize vision",
    "quantize",
    "record",
    "check",
    "verify graphs",
    "verify chain",
    "reference",
    "llm_head",
    "llm_tail",
    "tokenizer",
    "manifest",
    "vision",
    "embed",
    "prune",
    "load",
    "lint",
    "done",
]  # longest first where one prefixes another
STAGE_LINE = re.compile(r"^(" + "|".join(re.escape(s) for s in STAGES) + r") +\S")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
SIZES = {  # option -> (TinyLlavaSpec field, default)
    "image_size": ("image_size", 336),
    "patch_size": ("patch_size", 14),
    "vision_hidden": ("vision_hidden_size", 1024),
    "vision_intermediate": ("vision_intermediate_size", 4096),
    "vision_layers": ("vision_layers", 24),
    "vision_heads": ("vision_heads", 16),
    "hidden": ("hidden_size", 2048),
    "intermediate": ("intermediate_size", 5632),
    "layers": ("num_layers", 16),
    "heads": ("num_heads", 32),
    "kv_heads": ("num_kv_heads", 4),
    "vocab": ("vocab_size", None),  # None: the test tokenizer's (a few hundred rows)
}


def size_args(args) -> list[str]:
    """The SIZES options as given, for the checkpoint-building child (--_build)."""
    return [f"--{o.replace('_', '-')}={getattr(args, o)}" for o in SIZES if getattr(args, o) is not None]


NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))  # LLaVA-1.6's


def build_checkpoint(folder: Path, sizes: dict, dtype: str, next_: bool = False) -> dict:
    """Runs in its own child process (--_build): write the checkpoint, re-save the weights in dtype.
    next_: a LLaVA-NeXT checkpoint with LLaVA-1.6's pinpoints (5 views, 2928 image tokens)."""
    import torch
    from safetensors.torch import load_file, save_file

    from mllm_edge.testing.checkpoints import TinyLlavaSpec, make_tiny_llava

    extra = {"image_grid_pinpoints": NEXT_PINPOINTS, "max_position_embeddings": 4096} if next_ else {}
    spec = TinyLlavaSpec(name="bench_1b", initializer_range=0.02, seed=0, **sizes, **extra)
    # fp16 from the start and in 2 GB shards, so that a 7B-shaped checkpoint can be made in 24 GB
    make_tiny_llava(folder, spec, dtype="float16" if dtype == "fp16" else "float32", max_shard_size="2GB")
    params, saved = 0, {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors = load_file(file)
        params += sum(t.numel() for t in tensors.values())
        saved[file.name] = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
        if dtype == "fp16" and any(t.dtype == torch.float32 for t in tensors.values()):
            tensors = {k: v.half() if v.dtype == torch.float32 else v for k, v in tensors.items()}
            save_file(tensors, file, metadata={"format": "pt"})
        del tensors
    return {"params": params, "saved_by_make_tiny_llava": saved}


def read_rss(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile of pid in bytes ({} once it has gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {
        k: int(v.split()[0]) * 1024 for k, v in re.findall(r"^(VmRSS|RssAnon|RssFile):\s+(.*)$", text, re.M)
    }


def measure(name: str, cmd: list[str], log: Path) -> dict:
    """Run cmd, wait for it with os.wait4 (its own ru_maxrss), sample its RSS per stage meanwhile."""
    env = {**os.environ, "TTY_COMPATIBLE": "1", "COLUMNS": "100"}  # rich draws the progress bar into the pipe
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    state = {"stage": "start", "peaks": {}, "first": {}}
    out_chunks, err_chunks = [], []

    def read_stderr():
        pending = ""
        for chunk in iter(lambda: os.read(proc.stderr.fileno(), 65536), b""):
            text = chunk.decode(errors="replace")
            err_chunks.append(text)
            *lines, pending = re.split(r"[\r\n]", ANSI.sub("", pending + text))
            for line in lines:
                if (m := STAGE_LINE.match(line)) and m.group(1) != state["stage"]:
                    state["stage"] = m.group(1)
                    state["first"].setdefault(m.group(1), round(time.perf_counter() - start, 1))

    def sample():
        while proc.returncode is None and (rss := read_rss(proc.pid)):
            peak = state["peaks"].get(state["stage"])
            if peak is None or rss.get("VmRSS", 0) > peak["VmRSS"]:
                state["peaks"][state["stage"]] = rss
            time.sleep(0.5)

    threads = [threading.Thread(target=f, daemon=True) for f in (read_stderr, sample)]
    threads.append(
        threading.Thread(
            target=lambda: out_chunks.append(proc.stdout.read().decode(errors="replace")), daemon=True
        )
    )
    for t in threads:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    for t in threads:
        t.join(timeout=5)
    stdout, stderr = ANSI.sub("", "".join(out_chunks)), ANSI.sub("", "".join(err_chunks))
    log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n")
    if proc.returncode != 0:
        sys.exit(
            f"{name}: {cmd[3] if len(cmd) > 3 else 'the command'} failed with exit code {proc.returncode}; log: {log}\n"
            + stderr[-4000:]
        )
    peaks = {s: {k: round(v / GB, 3) for k, v in r.items()} for s, r in state["peaks"].items()}
    top = max(peaks, key=lambda s: peaks[s]["VmRSS"]) if peaks else None
    return {
        "run": name,
        "wall_s": round(seconds, 1),
        "peak_rss_gb": round(usage.ru_maxrss * 1024 / GB, 3),
        "sampled_peak_by_stage_gb": peaks,
        "sampled_peak_stage": top,
        "stage_start_s": state["first"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--work",
        type=Path,
        help="checkpoint and bundles go here [default: a temp dir, deleted unless --keep]",
    )
    p.add_argument("--keep", action="store_true", help="keep --work (or the temp dir) afterwards")
    p.add_argument(
        "--dtype",
        choices=["fp32", "fp16"],
        default="fp16",
        help="export dtype, and that of the saved weights",
    )
    p.add_argument("--method", default="fastv")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "export_memory.json")
    p.add_argument("--no-verify", action="store_true", help="only measure the export without verification")
    p.add_argument("--verify-only", action="store_true", help="only measure the verified export")
    p.add_argument(
        "--quantize",
        choices=["int8", "int4"],
        help="also measure a verified export with --quantize (needs --dtype fp32)",
    )
    for opt, (_, default) in SIZES.items():
        p.add_argument("--" + opt.replace("_", "-"), type=int, default=default)
    p.add_argument(
        "--next-7b",
        action="store_true",
        help="LLaVA-NeXT-7B's sizes (Vicuna-7B, CLIP-L/336): --next and the LLM sizes",
    )
    p.add_argument("--next", action="store_true", help="a LLaVA-NeXT checkpoint (LLaVA-1.6's pinpoints)")
    p.add_argument("--_build", type=Path, help=argparse.SUPPRESS)  # internal: the checkpoint-building child
    args = p.parse_args()
    if args.quantize and args.dtype != "fp32":
        p.error("--quantize needs --dtype fp32")
    if args.next_7b:  # llava-hf/llava-v1.6-vicuna-7b-hf's text model
        args.next = True
        args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads = 4096, 11008, 32, 32, 32
        args.vocab = 32064
    sizes = {field: getattr(args, opt) for opt, (field, _) in SIZES.items()}
    if args._build:
        print(json.dumps(build_checkpoint(args._build, sizes, args.dtype, args.next)))
        return

    with work_dir(args.work, args.keep, "export_memory") as work:
        folder = work / "checkpoint"
        print(f"building the checkpoint in {folder} (not timed) ...", flush=True)
        built = subprocess.run(
            [sys.executable, __file__, "--_build", str(folder), "--dtype", args.dtype]
            + size_args(args)
            + (["--next"] if args.next else []),
            check=True,
            stdout=subprocess.PIPE,
            text=True,
        )
        info = json.loads(built.stdout.strip().splitlines()[-1])
        weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        print(
            f"{info['params'] / 1e9:.3f} B parameters; weights {weights / GB:.3f} GB ({args.dtype}; "
            f"make_tiny_llava saved {info['saved_by_make_tiny_llava']})",
            flush=True,
        )

        runs = [("verify", []), ("no-verify", ["--no-verify"])]
        runs = runs[1:] if args.no_verify else runs[:1] if args.verify_only else runs
        if args.quantize:
            runs.append((f"{args.quantize}, verify", ["--quantize", args.quantize]))
        results = []
        for name, extra in runs:
            cmd = [
                sys.executable,
                "-m",
                "mllm_edge.cli",
                "export",
                "--model",
                str(folder),
                "--out",
                str(work / f"bundle-{name.replace(', ', '-')}"),
                "--method",
                args.method,
                "--ratio",
                str(args.ratio),
                "--dtype",
                args.dtype,
                "--force",
                *extra,
            ]
            print(f"export ({name}) ...", flush=True)
            r = measure(name, cmd, work / f"export-{name.replace(', ', '-')}.log")
            r["weights_gb"] = round(weights / GB, 3)
            r["peak_over_weights"] = round(r["peak_rss_gb"] * GB / weights, 2)
            results.append(r)

        print(
            f"\n{'run':<14} {'wall s':>8} {'peak RSS GB':>12} {'weights GB':>11} {'peak/weights':>13}  sampled peak in stage"
        )
        for r in results:
            print(
                f"{r['run']:<14} {r['wall_s']:>8.1f} {r['peak_rss_gb']:>12.2f} {r['weights_gb']:>11.2f} "
                f"{r['peak_over_weights']:>13.2f}  {r['sampled_peak_stage']}"
            )
        ok = all(r["peak_over_weights"] <= 2 for r in results)
        print(f"target: peak RSS <= 2x weights: {'met' if ok else 'NOT met'}")

        record = {
            "machine": machine(),
            "model": {
                **sizes,
                "vision_feature_layer": -2,
                "params": info["params"],
                "image_grid_pinpoints": NEXT_PINPOINTS if args.next else None,
            },
            "dtype": args.dtype,
            "method": args.method,
            "ratio": args.ratio,
            "weights_bytes": weights,
            "target": "peak RSS <= 2x weights",
            "target_met": ok,
            "runs": results,
            "saved_by_make_tiny_llava": info["saved_by_make_tiny_llava"],
        }
        write_json(args.json, record)


if __name__ == "__main__":
    main()
