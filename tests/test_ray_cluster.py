"""Ray across two nodes of one machine (a `ray start` head and a second node): the same tables as a local Ray, steps
on both nodes, and a local run beside the started cluster kept to itself. Apart from tests/test_ray.py so that
pytest-xdist runs the two long Ray tests on different workers."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from test_ray import assert_same_tables, leftovers, one_thread, workers  # noqa: F401 - one_thread is a fixture
from test_study import write_study
from transferlab.executors import session_processes
from transferlab.study import StudyRunOptions, run_study

pytestmark = pytest.mark.ray


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

