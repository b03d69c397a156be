"""What the benchmark scripts share: the machine description, the work folder, the JSON record."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path

GB = 1e9


def machine() -> dict:
    meminfo = Path("/proc/meminfo").read_text()
    total_kib = int(re.search(r"^MemTotal:\s+(\d+)", meminfo, re.M).group(1))
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    # "AMD EPYC" alone names both a Zen 3 (family 25, model 1, AVX2 only) and a Zen 4 (AVX-512)
    family, number = (re.search(rf"^{key}\s*:\s*(\d+)$", cpuinfo, re.M) for key in ("cpu family", "model"))
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        # the machines this project runs on change between sessions (an Intel Xeon with AMX, AMD
        # EPYCs with and without AVX-512): a record is comparable only to one made on the same CPU
        "cpu": {
            "model": model[1].strip() if model else platform.processor(),
            "avx512": " avx512f" in cpuinfo,
            "amx": " amx_tile" in cpuinfo,
            "family": int(family[1]) if family else None,
            "model_number": int(number[1]) if number else None,
        },
        "cpu_count": os.cpu_count(),
        "ram_total_gb": round(total_kib * 1024 / GB, 1),
        "torch": version("torch"),
        "transformers": version("transformers"),
        "onnxruntime": version("onnxruntime"),
    }


@contextlib.contextmanager
def work_dir(work: Path | None, keep: bool, prefix: str):
    """The folder for checkpoints and bundles: `work`, or a temp dir deleted afterwards unless `keep`
    or something failed (its logs are there)."""
    folder = work or Path(tempfile.mkdtemp(prefix=f"{prefix}.", dir="/tmp"))
    folder.mkdir(parents=True, exist_ok=True)
    finished = False
    try:
        yield folder
        finished = True
    finally:
        if finished and not keep and not work:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            print(f"kept {folder}")


def write_json(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
