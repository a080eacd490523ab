"""Studies on Ray: the same tables as the local executor, on one node, on two nodes, and after a worker dies.

The first test starts Ray through the CLI (`--executor ray --jobs 2`); the other two share one small
two-node Ray cluster on this machine (loopback only, started once for the module). A step holds one CPU and so
runs one torch thread; the local runs they are compared with use one thread too, since the thread count
changes float reduction order (README: "Same numbers").
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from test_study import TINY, write_study
from transferlab.executors import session_processes
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
# address="local", even beside a `ray start` cluster: test_steps_spread_over_two_nodes_with_the_same_tables).
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_node_cluster():
    """A head node and a second node, one CPU each, both on this machine (started once for this module)."""
    ray_cli = str(Path(sys.executable).parent / "ray")
    port = _free_port()
    common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    # Ray 2.60's `ray start --head` turns token authentication on unless RAY_AUTH_MODE says otherwise, while a
    # joining node assumes it off: the mode must be the same on every node and in the driver (set above).
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    # A temp folder of its own (short: Ray's socket paths must fit 107 bytes), named in every head process's
    # command line, as the head's address is in the second node's: the teardown stops these processes only.
    # `ray stop` would stop every Ray on the machine, and pytest-xdist runs other Ray tests beside this one
    # (a driver whose Ray is stopped under it exits: the worker running it died).
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    try:
        subprocess.run([ray_cli, "start", "--head", "--port", str(port), "--include-dashboard=false",
                        "--temp-dir", temp_dir, *common], check=True, capture_output=True, env=env, timeout=120)
        subprocess.run([ray_cli, "start", "--address", f"127.0.0.1:{port}", *common], check=True,
                       capture_output=True, env=env, timeout=120)
        yield f"127.0.0.1:{port}"
    finally:
        for marker in (f"127.0.0.1:{port}", temp_dir):
            for pid in session_processes(marker):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_steps_spread_over_two_nodes_with_the_same_tables(tmp_path, one_thread, two_node_cluster):
    """The same tables from a two-node cluster as from a local Ray, and the local one kept to itself: without
    --address, `--executor ray` starts a Ray of its own (address="local") even while `ray start` left this cluster
    running on the machine (plain ray.init() would join it), so its steps ran on a node of its own, and the cluster
    it left alone still has both nodes for the run after it."""
    from transferlab.executors import RayExecutor

    study = write_study(tmp_path)
    run_study(study, tmp_path / "local", StudyRunOptions(progress=False, executor=RayExecutor(jobs=1)))
    on_cluster = run_study(study, tmp_path / "cluster",
                           StudyRunOptions(progress=False, executor=RayExecutor(address=two_node_cluster)))
    assert len(on_cluster.executed) == len(on_cluster.steps)
    nodes = {w["node_id"] for w in workers(tmp_path / "cluster")}
    assert len(nodes) == 2, "every training step ran on the same node"
    assert {w["node_id"] for w in workers(tmp_path / "local")}.isdisjoint(nodes)
    assert_same_tables(tmp_path / "local", tmp_path / "cluster")
    assert {w["executor"] for w in workers(tmp_path / "cluster")} == {"ray"}
    assert not leftovers(tmp_path / "cluster")
    again = run_study(study, tmp_path / "cluster",
                      StudyRunOptions(progress=False, executor=RayExecutor(address=two_node_cluster)))
    assert again.executed == []  # a second run finds every step done
    # A cluster joined with --address is someone else's: disconnecting from it must leave it running.
    from transferlab.executors import _check_reachable

    _check_reachable(two_node_cluster)

