"""Writing a folder all at once: into a hidden `.NAME.<pid>.<random>.partial` beside it, renamed into
place only when complete. Used by export (bundles) and build (engine folders).

- A failure, Ctrl-C, SIGTERM or SIGHUP removes the partial folder (`signals_as_interrupts` turns the
  two signals into an exception, so the same cleanup runs).
- A process killed outright (SIGKILL, power loss) cannot clean up: its partial folder names its pid,
  and the next write into the same parent removes partial folders whose process is gone.
- Two writers of one folder are serialised by a lock (`locked`, a file in the temp folder named by
  the destination's path): the second waits.
Standard library only (POSIX locks; elsewhere writers are not serialised).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from .errors import MllmEdgeError

_PARTIAL = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.(partial|old)$")


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: unwind (and clean up) as for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


@contextlib.contextmanager
def signals_as_interrupts():
    """Within the block, SIGTERM and SIGHUP raise Terminated (main thread only: signals reach no other)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Terminated(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale(out: Path) -> list[Path]:
    """Remove partial (and left-over old) folders of `out` whose writing process is gone. An old
    folder is the previous `out` set aside while the new one was moved in: where `out` is missing
    (the writer died in between) it is put back, not removed."""
    removed = []
    for path in sorted(out.parent.glob(f".{out.name}.*")):
        match = _PARTIAL.match(path.name)
        if not (match and match["name"] == out.name and path.is_dir() and not _alive(int(match["pid"]))):
            continue
        if path.name.endswith(".old") and not out.exists():
            os.replace(path, out)
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def partial_folder(out: Path, kind: str = "partial") -> Path:
    """A new hidden folder beside `out` that names this process."""
    try:
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=f".{kind}", dir=out.parent))
    except OSError as e:
        raise MllmEdgeError(f"cannot write into {out.parent}: {e.strerror}") from None


def lock_file(out: Path) -> Path:
    """The lock of `out`: in this machine's temp folder, named by out's absolute path, so that nothing
    is left beside the folder (and a lock file is never removed while another writer waits on it)."""
    key = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:32]
    return Path(tempfile.gettempdir()) / "mllm-edge-locks" / f"{key}.lock"


@contextlib.contextmanager
def locked(out: Path):
    """Hold out's lock for the block; another writer of `out` on this machine waits for it."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    path = lock_file(out)
    try:
        path.parent.mkdir(exist_ok=True)
        handle = open(path, "a")
    except OSError as e:
        raise MllmEdgeError(f"cannot create the lock {path}: {e.strerror}") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
