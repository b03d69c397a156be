"""Tables for the terminal: the closing summary of an export and `mllm-edge inspect`.

Plain functions from data to rich renderables; the CLI decides where they are printed.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from rich.table import Table
from rich.text import Text

from ..manifest import Manifest


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def graph_sizes(manifest: Manifest, sizes: dict[str, int]) -> dict[str, int]:
    """Bytes per graph: its .onnx file and the data files it owns (a shared file counts once, for its
    owner); its fused copy for ONNX Runtime is not counted (files_table lists the copies apart)."""
    total = defaultdict(int)
    for name, spec in manifest.graphs.items():
        total[name] += sizes.get(spec.file, 0) + sizes.get(f"{spec.file}.data", 0)
    return dict(total)


def files_table(manifest: Manifest, sizes: dict[str, int]) -> Table:
    table = Table(title="bundle", title_justify="left")
    table.add_column("part")
    table.add_column("size", justify="right")
    for name, size in graph_sizes(manifest, sizes).items():
        table.add_row(f"{name} graph", human_bytes(size))
    copies = [spec.onnxruntime_file for spec in manifest.graphs.values() if spec.onnxruntime_file]
    if copies:
        table.add_row("ONNX Runtime's fused copies", human_bytes(sum(sizes.get(f, 0) for f in copies)))
    for prefix in ("tokenizer/", "samples/"):
        table.add_row(prefix, human_bytes(sum(s for rel, s in sizes.items() if rel.startswith(prefix))))
    table.add_row("total", human_bytes(sum(sizes.values())))
    return table


def weights_line(manifest: Manifest) -> str:
    q = manifest.quantization
    if not q:
        return manifest.dtype
    where = "ONNX Runtime only" if "tensorrt" not in manifest.backends else "Q/DQ for TensorRT"
    return f"{manifest.dtype}, {q['weights']} weights in {' and '.join(q['graphs'])} ({where})"


def pruning_line(manifest: Manifest) -> str:
    p = manifest.pruning
    tokens = p["image_tokens"]
    parts = [f"method {p['method']}"]
    if p["fastervlm"]:
        per_view = f" ({p['fastervlm']['keep']} patches per view)" if manifest.anyres else ""
        parts.append(f"FasterVLM R={p['fastervlm']['ratio']:g}{per_view}")
    if p["fastv"]:
        parts.append(f"FastV K={p['fastv']['k']} R={p['fastv']['ratio']:g}")
    largest = "of the largest picture " if manifest.anyres else ""
    flow = f"image tokens {largest}{tokens['vision']} -> {tokens['llm']} into the LLM"
    if p["fastv"]:
        flow += f" -> {tokens['after_fastv']} from layer {p['split_layer']}"
    return ", ".join(parts) + "; " + flow


def geometry_line(manifest: Manifest) -> str | None:
    """LLaVA-NeXT's views: what a picture becomes (None for a bundle of one view)."""
    if not manifest.anyres:
        return None
    a = manifest.architecture
    tile = a["vision"]["image_size"]
    points = ", ".join(f"{h}x{w}" for h, w in a["image_grid_pinpoints"])
    return (
        f"anyres views: a base view and tiles of {tile} px of the best of {points} (height x width); "
        f"up to {a['max_views']} views, {a['num_image_tokens']} image tokens"
    )


def checks_table(checks, chain) -> Table:
    table = Table(title="ONNX Runtime vs PyTorch", title_justify="left")
    for column in ("graph", "output", "max abs error", "error / scale", ""):
        table.add_column(column, justify="right" if "error" in column else "left")
    for c in checks:
        table.add_row(c.graph, c.output, f"{c.max_abs:.2e}", f"{c.rel:.2e}", "ok" if c.ok else "FAIL")
    if chain is not None:
        same = "identical" if chain.reference == chain.onnx else "ties" if chain.ok else "DIFFER"
        same = same if chain.max_rel <= chain.tolerance else "FAIL"
        table.add_row("chain", f"{len(chain.reference)} greedy tokens", "", f"{chain.max_rel:.2e}", same)
    return table


def io_table(manifest: Manifest, name: str) -> Table:
    spec = manifest.graphs[name]
    table = Table(title=f"{name} ({spec.file})", title_justify="left")
    table.add_column("")
    table.add_column("tensor")
    table.add_column("dtype")
    table.add_column("shape")
    rows = [("in", t) for t in spec.inputs] + [("out", t) for t in spec.outputs]
    # the LLM graphs have a K and a V tensor per layer: one row per family, "past_key.0 … past_key.1"
    families: dict[str, list[str]] = defaultdict(list)
    for _, t in rows:
        if "." in t.name:
            families[t.name.split(".")[0]].append(t.name)
    for kind, t in rows:
        members = families.get(t.name.split(".")[0]) if "." in t.name else None
        if members and t.name != members[0]:
            continue
        label = f"{members[0]} … {members[-1]}" if members and len(members) > 1 else t.name
        table.add_row(kind, label, t.dtype, Text("[" + ", ".join(str(d) for d in t.shape) + "]"))
    return table


def bundle_sizes(folder: Path, manifest: Manifest) -> dict[str, int]:
    return {rel: (folder / rel).stat().st_size for rel in manifest.files if (folder / rel).is_file()}
