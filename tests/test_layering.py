"""Which parts of the package may import which: read from the source, so a lazy import counts too.

The runtime runs on a Jetson with numpy, tokenizers, Pillow and TensorRT or ONNX Runtime alone, so
it imports nothing of the exporting side; dependencies between the package's parts go one way.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import mllm_edge

PACKAGE = Path(mllm_edge.__file__).parent
HEAVY = ("torch", "transformers", "onnx", "onnxscript", "safetensors")
NOT_FOR_THE_RUNTIME = ("build", "export", "models", "testing", "default_model", "pruning")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, name: str | None = None) -> set[str]:
    """Every module a file imports, anywhere in it, as absolute names (`name`: the file's module)."""
    name = name or module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names}  # `from . import x` names a module
    return found


def forbidden_for_the_runtime(path: Path, name: str | None = None) -> list[str]:
    bad = []
    for target in imports(path, name):
        top = target.split(".")[0]
        if top in HEAVY or (top == "mllm_edge" and part(target) in NOT_FOR_THE_RUNTIME):
            bad.append(f"{name or module_name(path)} imports {target}")
    return bad


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports(path) if m in modules} for name, path in modules.items()}


def part(module: str) -> str:
    """mllm_edge.runtime.backends.tensorrt -> runtime; mllm_edge.manifest -> manifest."""
    return module.split(".")[1] if module.count(".") else module


def test_the_runtime_imports_nothing_of_the_exporting_side():
    bad = [line for path in (PACKAGE / "runtime").rglob("*.py") for line in forbidden_for_the_runtime(path)]
    assert not bad, bad


def test_the_rule_would_catch_a_forbidden_import(tmp_path):
    """The check is not blind: a runtime module's lazy relative import of export/ and its torch import
    are both found (a probe file read as if it were mllm_edge.runtime.backends.probe)."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from ...export import verify\n    import torch\n")
    assert sorted(forbidden_for_the_runtime(probe, "mllm_edge.runtime.backends.probe")) == [
        "mllm_edge.runtime.backends.probe imports mllm_edge.export",
        "mllm_edge.runtime.backends.probe imports mllm_edge.export.verify",
        "mllm_edge.runtime.backends.probe imports torch",
    ]


def test_no_import_cycles_between_the_parts():
    """Parts are the top-level modules and subpackages (runtime, build, export, models, ...)."""
    edges: dict[str, set[str]] = {}
    for module, targets in graph().items():
        edges.setdefault(part(module), set()).update(part(t) for t in targets if part(t) != part(module))
    cycles = []

    def visit(node, path):
        for nxt in edges.get(node, ()):
            if nxt in path:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif len(path) < len(edges):
                visit(nxt, path + [nxt])

    for start in edges:
        visit(start, [start])
    assert not cycles, sorted({" -> ".join(c) for c in cycles})


def test_importing_the_runtime_loads_no_heavy_module():
    code = (
        "import sys, mllm_edge.runtime.pipeline, mllm_edge.runtime.backends.onnxruntime, "
        "mllm_edge.runtime.backends.tensorrt, mllm_edge.engines, mllm_edge.graphs\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
