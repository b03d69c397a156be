"""The `trtexec` command lines equivalent to a build, for users who build with NVIDIA's own CLI.

One line per graph: its profiles as --profile=i followed by that profile's --minShapes, --optShapes
and --maxShapes (trtexec's syntax since 8.x; shapes as name:1x3x336x336), the workspace as
--memPoolSize=workspace:<MiB>M, the shared timing cache, and the precision: nothing for a strongly
typed build on TensorRT 11 (the graph's dtypes decide), --stronglyTyped on 10, --fp16/--bf16 for a
weakly typed one (TensorRT 10 only).
"""

from __future__ import annotations

import shlex

from .profiles import Profile
from .settings import BuildSettings, trt_major

TRTEXEC = "trtexec"  # on JetPack: /usr/src/tensorrt/bin/trtexec


def _dims(shape) -> str:
    return "x".join(str(d) for d in shape) if len(shape) else "scalar"


def trtexec_command(
    onnx: str,
    engine: str,
    profiles: list[Profile],
    settings: BuildSettings,
    trt_version: str,
    timing_cache: str,
) -> list[str]:
    cmd = [TRTEXEC, f"--onnx={onnx}", f"--saveEngine={engine}", "--skipInference"]
    if any(p.shapes for p in profiles):
        for i, p in enumerate(profiles):
            cmd.append(f"--profile={i}")
            for flag, which in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
                cmd.append(
                    flag
                    + "="
                    + ",".join(f"{name}:{_dims(shapes[which])}" for name, shapes in p.shapes.items())
                )
    cmd.append(f"--memPoolSize=workspace:{settings.workspace_mb}M")
    cmd.append(f"--timingCacheFile={timing_cache}")
    cmd.append(f"--builderOptimizationLevel={settings.optimization_level}")
    if settings.strongly_typed:
        if trt_major(trt_version) < 11:
            cmd.append("--stronglyTyped")  # a no-op kept for compatibility on 11
    else:
        cmd.extend(f"--{flag.lower()}" for flag in settings.builder_flags)
    return cmd


def trtexec_script(commands: dict[str, list[str]], header: str, out_default: str, adopt: str) -> str:
    """A bash script running each graph's command; the engines go to OUT (its first argument, else
    out_default, relative to the script's folder), which `adopt` then registers."""
    lines = [
        "#!/usr/bin/env bash",
        f"# {header}",
        f"# Builds every engine with NVIDIA's trtexec into OUT (the first argument; default {out_default}",
        "# beside this folder), never into this folder, whose engines.json vouches for its engines. Then:",
        f"#   {adopt}",
        "# On JetPack: TRTEXEC=/usr/src/tensorrt/bin/trtexec.",
        "set -euo pipefail",
        'HERE="$(cd "$(dirname "$0")" && pwd)"',
        f'OUT="${{1:-$HERE/{out_default}}}"',
        'mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"',
        'cd "$HERE"',
        'TRTEXEC="${TRTEXEC:-trtexec}"',
        "",
    ]
    for graph, cmd in commands.items():
        args = [
            f'--saveEngine="$OUT"/{shlex.quote(a.split("=", 1)[1])}'
            if a.startswith("--saveEngine=")
            else shlex.quote(a)
            for a in cmd[1:]
        ]
        lines.append(f"# {graph}")
        lines.append('"$TRTEXEC" ' + " ".join(args))
    return "\n".join(lines) + "\n"
