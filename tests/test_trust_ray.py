"""Issue 26, item 4: Ray fails fast on a dead address, stops on SIGTERM (lock released, Ray shut down), and a
local cluster whose driver was killed does not outlive it (reaped on the next start)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import assert_user_error
from test_study import TINY, write_study

# As tests/test_ray.py: Ray reads RAY_AUTH_MODE when it is imported, and its local heads default to token auth.
os.environ.setdefault("RAY_AUTH_MODE", "token")
ray = pytest.importorskip("ray", reason="the ray extra is part of the test extra")
pytestmark = pytest.mark.ray

SLOW = TINY.replace("epochs = 2", "epochs = 300")


@pytest.mark.parametrize("address", ["bogus.invalid:1", "127.0.0.1:1"])
def test_a_dead_address_is_one_line_within_seconds(tmp_path, capsys, monkeypatch, address):
    from transferlab import executors

    monkeypatch.setattr(executors, "CONNECT_TIMEOUT_S", 3)  # the default is 20 s
    started = time.monotonic()
    assert_user_error(["run", write_study(tmp_path), "--executor", "ray", "--address", address, "--no-progress",
                       "--out", tmp_path / "o"], capsys, f"--address {address}")
    assert time.monotonic() - started < 30
    assert not (tmp_path / "o" / ".lock").exists()


def _start(tmp_path) -> tuple[subprocess.Popen, Path, str]:
    """A study on a local Ray in a child process, once its first step runs; with the Ray session it started."""
    out = tmp_path / "ray"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "transferlab.cli", "run", str(write_study(tmp_path, SLOW)),
                             "--out", str(out), "--no-progress", "--executor", "ray", "--jobs", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    sessions = Path(os.environ["TRANSFERLAB_CACHE"]) / "ray-sessions.json"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        found = json.loads(sessions.read_text()) if sessions.is_file() else {}
        mine = [s for s, pid in found.items() if pid == proc.pid]
        if mine and (out / ".lock").exists():
            time.sleep(3)  # into the first step
            return proc, out, mine[0]
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("the Ray run never started: " + proc.communicate()[0].decode()[-2000:])


def test_sigterm_stops_the_run_releases_the_lock_and_shuts_ray_down(tmp_path):
    from transferlab.executors import session_processes

    proc, out, session = _start(tmp_path)
    assert session_processes(session)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output.decode()[-2000:]
    assert "Traceback" not in output.decode()
    assert not (out / ".lock").exists()
    assert session_processes(session) == []


def test_a_cluster_whose_driver_was_killed_is_reaped_on_the_next_start(tmp_path):
    from transferlab.executors import reap_orphaned_sessions, session_processes

    proc, out, session = _start(tmp_path)
    proc.kill()
    proc.communicate(timeout=60)
    reap_orphaned_sessions()  # what the next local start does first
    time.sleep(0.5)
    assert session_processes(session) == []
