"""Files checked against their sha256 once, then trusted while they stay as they were.

Hashing a 7B bundle (about 14 GB in fp16) takes seconds to tens of seconds on a Jetson, before every
run. So after a full check the verified state of each file is recorded (size, mtime, inode, and the
sha256 it was checked against) in this machine's cache folder, outside the bundle (which may be on
read-only media); a later check re-reads only files whose state changed or whose expected sha256
is another. This guards against damage (a truncated copy, a file replaced or edited), not against
someone who forges a file's size and times on purpose. `mllm-edge verify` checks everything again.
Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

RECORD_VERSION = 1


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cache_folder() -> Path:
    """$MLLM_EDGE_CACHE, else $XDG_CACHE_HOME/mllm-edge, else ~/.cache/mllm-edge."""
    if os.environ.get("MLLM_EDGE_CACHE"):
        return Path(os.environ["MLLM_EDGE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mllm-edge"


def _record_path(folder: Path) -> Path:
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:32]
    return cache_folder() / "verified" / f"{key}.json"


RACY_NS = 2_000_000_000  # a file changed this recently may change again within one clock tick unseen


def _state(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _settled(state: list) -> bool:
    """Whether a file's state can be trusted later: file times are coarse (a clock tick), so a file
    written just now could be written again with the same size and times; such files are hashed
    again next time (git's "racily clean" rule)."""
    return time.time_ns() - state[1] > RACY_NS


def _read_record(folder: Path) -> dict:
    try:
        data = json.loads(_record_path(folder).read_text())
    except (OSError, ValueError):
        return {}
    ok = (
        isinstance(data, dict)
        and data.get("version") == RECORD_VERSION
        and data.get("folder") == str(folder.resolve())
    )
    return data.get("files", {}) if ok and isinstance(data.get("files"), dict) else {}


def _write_record(folder: Path, files: dict) -> None:
    """Best effort: a machine whose cache folder cannot be written just hashes every time."""
    path = _record_path(folder)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(
            json.dumps({"version": RECORD_VERSION, "folder": str(folder.resolve()), "files": files})
        )
        os.replace(tmp, path)
    except OSError:
        pass


def check_files(folder: Path, expected: dict[str, str], full: bool = False) -> tuple[str, str] | None:
    """Check folder/<rel> against expected[rel] (sha256) -> None, or ("missing" | "damaged", rel) for
    the first file at fault. Files whose recorded state is unchanged are not re-read unless `full`."""
    folder = Path(folder)
    known = _read_record(folder)
    trusted = {} if full else known
    updated, changed = dict(known), False
    try:
        for rel, sha in expected.items():
            path = folder / rel
            if not path.is_file():
                return "missing", rel
            state = [*_state(path), sha]
            if trusted.get(rel) == state:
                continue
            changed = True
            if sha256_file(path) != sha:
                updated.pop(rel, None)
                return "damaged", rel
            if _settled(state):
                updated[rel] = state
            else:
                updated.pop(rel, None)
        return None
    finally:
        if changed:
            _write_record(folder, updated)
