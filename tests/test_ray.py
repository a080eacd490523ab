"""Studies on Ray: the same tables as the local executor, on one node, on two nodes, and after a worker dies.

The first test starts Ray through the CLI (`--executor ray --jobs 2`); the other two share one small
two-node Ray cluster on this machine (loopback only, started once for the module). A step holds one CPU and so
runs one torch thread; the local runs they are compared with use one thread too, since the thread count
changes float reduction order (README: "Same numbers").
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from test_study import TINY, write_study
from transferlab.names import STAGING_PATTERN
from transferlab.study import StudyRunOptions, run_study

# Ray reads RAY_AUTH_MODE when it is imported, so the driver's mode is set before the import: token, as
# `ray start --head` uses by default since Ray 2.60 (README, "Running on a cluster").
os.environ.setdefault("RAY_AUTH_MODE", "token")
ray = pytest.importorskip("ray", reason="the ray extra is part of the test extra")
pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
TABLES = ("runs.csv", "matrix/cells.csv", "matrix/lineage.csv", "matrix/pairs.csv")
# Fine-tunes long enough (a few seconds each) for a kill to land inside one; one per source (not two), since
# the study is trained twice (locally and on Ray) and one kill needs one fine-tune in flight.
SLOW_FINETUNES = TINY.replace("epochs = 2", "epochs = 300").replace("n = [200, 400]", "n = [200]")


@pytest.fixture
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_same_tables(a: Path, b: Path) -> None:
    for table in TABLES:
        left, right = pd.read_csv(a / table), pd.read_csv(b / table)
        columns = [c for c in left.columns if c not in ("duration_s", "images_per_second")]
        pd.testing.assert_frame_equal(left[columns], right[columns], obj=table)


def leftovers(out: Path) -> list[Path]:
    return [p for p in out.rglob(".*") if STAGING_PATTERN.fullmatch(p.name)]


def workers(out: Path) -> list[dict]:
    return [json.loads(p.read_text())["worker"] for p in (out / "runs").glob("*/run.json")]


def _parent(pid: int) -> int | None:
    try:
        return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid and pid > 1:
        if pid == ancestor:
            return True
        pid = _parent(pid)
    return False


def _task_processes(driver: int) -> dict[int, str]:
    """pid -> process title of the Ray workers of ``driver``'s own local cluster running a task
    ('ray::finetune/k/mnist-sample200/f2/s0'): never another test's Ray (pytest-xdist runs tests side by side)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if title.startswith("ray::") and _descends_from(int(entry.name), driver):
                found[int(entry.name)] = title
    return found


# First in the file, before two_node_cluster starts (`--executor ray` without --address starts a Ray of its own,
# address="local", even beside a `ray start` cluster: test_ray_cluster.py checks it).
def test_a_worker_killed_mid_step_is_retried_and_the_tables_are_unchanged(tmp_path, one_thread):
    study = write_study(tmp_path, SLOW_FINETUNES)
    run_study(study, tmp_path / "local", StudyRunOptions(progress=False))
    out = tmp_path / "ray"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "transferlab.cli", "run", str(study), "--out", str(out),
                             "--no-progress", "--executor", "ray", "--jobs", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env)
    killed, first_seen = None, {}
    deadline = time.time() + 240
    while killed is None and time.time() < deadline and proc.poll() is None:
        for pid, title in _task_processes(proc.pid).items():
            # A worker that has been running a fine-tune for a moment is in the middle of training it.
            if title.startswith("ray::finetune/"):
                first_seen.setdefault((pid, title), time.time())
                if time.time() - first_seen[(pid, title)] > 0.5:
                    os.kill(pid, signal.SIGKILL)
                    killed = title
                    break
        time.sleep(0.05)
    output, _ = proc.communicate(timeout=600)
    assert killed, "no fine-tune was caught in flight: " + output.decode()[-2000:]
    assert proc.returncode == 0, output.decode()[-2000:]
    assert_same_tables(tmp_path / "local", out)
    assert not leftovers(out), leftovers(out)  # the dead attempt's staging folder is gone
    assert len(list((out / "runs").glob("*/run.json"))) == 4  # 2 sources, 1 fine-tune of each
