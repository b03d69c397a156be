"""Exports that are stopped leave nothing behind, whatever stops them; writers of one folder take turns."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from mllm_edge.atomic import locked, remove_stale
from mllm_edge.errors import MllmEdgeError

EXPORT = """
import sys
from mllm_edge.cli import app
sys.argv = ["mllm-edge", "export", "--out", sys.argv[1], "--no-verify"]
app()
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_during_export_leaves_no_partial_folder(signum, tmp_path):
    out = tmp_path / "bundle"
    process = subprocess.Popen([sys.executable, "-c", EXPORT, str(out)], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".bundle.*.partial")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert list(tmp_path.glob(".bundle.*.partial")), "the export never started writing"
    time.sleep(0.5)  # inside loading or exporting
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr
    assert f"stopped by {signal.Signals(signum).name}; nothing half-written was left behind" in stderr
    assert "Traceback" not in stderr
    assert not out.exists() and not list(tmp_path.glob(".bundle.*.partial"))


def test_partial_folders_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    stale = tmp_path / f".bundle.{pid}.x1y2.partial"
    (stale / "graphs").mkdir(parents=True)
    live = tmp_path / f".bundle.{os.getpid()}.a1b2.partial"  # this process: still writing
    live.mkdir()
    other = tmp_path / f".other.{pid}.x1y2.partial"  # another folder's
    other.mkdir()
    assert remove_stale(tmp_path / "bundle") == [stale]
    assert not stale.exists() and live.exists() and other.exists()
    # a writer that died after setting the previous bundle aside: it is put back, not removed
    previous = tmp_path / f".bundle.{pid}.c3d4.old"
    (previous / "tokenizer").mkdir(parents=True)
    assert remove_stale(tmp_path / "bundle") == [] and (tmp_path / "bundle" / "tokenizer").is_dir()


def test_an_export_into_a_folder_being_written_waits_for_the_writer(tmp_path):
    from mllm_edge.export.bundle import ExportConfig, export_bundle

    out = tmp_path / "bundle"
    finished = []

    def second():
        try:
            export_bundle(ExportConfig(str(tmp_path / "no-such-model"), out))
        except MllmEdgeError as e:
            finished.append(str(e))

    with locked(out):  # as another export holds it
        thread = threading.Thread(target=second)
        thread.start()
        thread.join(1.0)
        assert thread.is_alive() and not finished  # waiting, not writing beside the first
    thread.join(30)
    assert finished and "no-such-model" in finished[0]
