"""What checking a bundle's files costs at start-up: a full sha256 pass (every run before the
verified-state record) against the record (mllm_edge.integrity: only changed files are re-read).

The bundle is synthetic: files of the sizes of a ~1B-parameter fp16 bundle (default 2.2 GB) with a
real manifest, since only the bytes matter to the check. Cold runs drop the page cache first (root
only; otherwise they are reported as not measured). Medians of --repeats runs.

    python benchmarks/bundle_load.py [--gb 2.2] [--repeats 3] [--json benchmarks/results/bundle_load.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, work_dir, write_json  # noqa: E402

from mllm_edge.manifest import GraphSpec, Manifest, load_manifest, write_manifest  # noqa: E402

# (file, share of the bytes): a LLaVA-like split, vision tower and projector, embedding table, layers
FILES = [("vision.onnx.data", 0.15), ("embed.onnx.data", 0.12), ("llm_tail.onnx.data", 0.73)]


def make_bundle(folder: Path, gb: float) -> None:
    block = os.urandom(1 << 24)
    for name, share in FILES:
        with open(folder / name, "wb") as f:
            for _ in range(int(gb * share * 1e9) >> 24):
                f.write(block)
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "tokenizer.json").write_text("{}")
    graphs = {
        n.split(".")[0]: GraphSpec(n.removesuffix(".data"), [], [], [n]) for n, _ in FILES
    }  # in run order
    for spec in graphs.values():
        (folder / spec.file).write_bytes(b"\0" * 4096)
    architecture = {  # a 1B-class LLaVA's numbers; only their form is checked here
        "text": {
            "num_layers": 22,
            "hidden_size": 2048,
            "num_kv_heads": 4,
            "head_dim": 64,
            "vocab_size": 32064,
        },
        "vision": {"image_size": 336, "patch_size": 14},
        "num_image_tokens": 576,
    }
    pruning = {"method": "none", "fastv": None, "fastervlm": None, "split_layer": 0}
    pruning["image_tokens"] = {"vision": 576, "llm": 576, "after_fastv": 576}
    tokenizer = {"folder": "tokenizer", "image_token_id": 32000, "eos_token_ids": [2]}
    manifest = Manifest(
        {"model": "synthetic"}, architecture, pruning, "float16", 2048, graphs, tokenizer, {}, {}
    )
    write_manifest(folder, manifest)
    old = time.time() - 3600  # written long ago, as a copied bundle is: its state can be trusted
    for path in folder.rglob("*"):
        os.utime(path, (old, old))


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(folder: Path, cold: bool) -> float | None:
    if cold and not drop_page_cache():
        return None
    start = time.perf_counter()
    load_manifest(folder)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=2.2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", type=Path)
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "bundle_load.json")
    args = p.parse_args()
    with work_dir(args.work, False, "bundle_load") as work:
        folder = work / "bundle"
        folder.mkdir()
        make_bundle(folder, args.gb)
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        rows = {}
        for cold in (True, False):
            for record in (False, True):
                runs = []
                for _ in range(args.repeats):
                    cache = tempfile.mkdtemp(dir=work)  # an empty cache: no record, as before
                    os.environ["MLLM_EDGE_CACHE"] = cache
                    if record:
                        load_manifest(folder)  # the first run writes the record
                    runs.append(timed(folder, cold))
                name = f"{'cold' if cold else 'warm'} page cache, {'with the record' if record else 'full sha256'}"
                rows[name] = None if None in runs else round(1000 * statistics.median(runs), 1)
    print(f"bundle of {size / 1e9:.2f} GB, medians of {args.repeats} (ms):")
    for name, ms in rows.items():
        print(f"  {name:<40} {'not measured (needs root)' if ms is None else f'{ms:10.1f}'}")
    write_json(
        args.json,
        {"machine": machine(), "bundle_gb": round(size / 1e9, 2), "repeats": args.repeats, "ms": rows},
    )


if __name__ == "__main__":
    main()
