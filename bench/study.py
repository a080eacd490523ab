"""Wall time and peak memory of the quick study per executor, and what a cluster would give the reference grid.

1. Runs ``transferlab run studies/quick.toml --out <fresh temporary directory>`` in a subprocess (a cold
   canvas cache, so nothing is reused from earlier runs) once per executor asked for:
   ``local`` (one step after another), ``ray`` (a local Ray with every core) and ``ray2`` (a two-node
   Ray cluster on this machine, half the cores each, started and stopped here). Reports wall time and
   peak resident memory (``ru_maxrss`` of the children) against the targets (40 s and 1.5 GB for the local
   executor on a 2-core machine), and checks that every executor's tables equal the local executor's.
2. Plans ``studies/reference.toml`` and puts a cost on every step from a model of its work (image passes
   times the measured per-image cost of its model family on this machine: forward+backward for training
   and crafting, forward for evaluation), then reports the serial sum, the critical path (the longest
   chain of dependent steps: no number of devices can beat it) and a greedy schedule on 8 workers.

    python bench/study.py                      # local, ray and ray2, plus the reference estimate
    python bench/study.py --executor local     # one executor only
    python bench/study.py --no-run             # only the reference estimate
"""

from __future__ import annotations

import argparse
import heapq
import os
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

from _common import ROOT, Timer, cores, cpu_model, finish, table

TARGET_SECONDS = 40
TARGET_BYTES = int(1.5 * 1024**3)
TABLES = ("runs.csv", "matrix/cells.csv", "matrix/lineage.csv", "matrix/pairs.csv")
EXECUTORS = ("local", "ray", "ray2")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", type=Path, default=ROOT / "studies" / "quick.toml")
    p.add_argument("--executor", default="local,ray,ray2", help="comma list of local, ray, ray2")
    p.add_argument("--reference", type=Path, default=ROOT / "studies" / "reference.toml")
    p.add_argument("--workers", type=int, default=8, help="devices in the scheduled estimate")
    p.add_argument("--no-run", action="store_true", help="only the reference estimate")
    p.add_argument("--device", default=None, help="override the study's device")
    p.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    return p.parse_args(argv)


def transferlab_command() -> list[str]:
    exe = Path(sys.executable).with_name("transferlab")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "transferlab.cli"]


# ---------------------------------------------------------------- 1. the quick study per executor
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_once(study: Path, executor: str, scratch: Path, device: str | None, env: dict) -> dict:
    out = scratch / f"out-{executor}"
    cmd = transferlab_command() + ["run", str(study), "--out", str(out), "--no-progress"]
    if device:
        cmd += ["--device", device]
    ray_cli = str(Path(sys.executable).with_name("ray"))
    started_cluster = False
    if executor == "ray":
        cmd += ["--executor", "ray"]
    elif executor == "ray2":  # a head and a second node on this machine, half the cores each
        port, half = _free_port(), str(max(1, cores() // 2))
        common = ["--num-cpus", half, "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
        started_cluster = True  # stopped below even when the second node fails to join
        try:
            for args in (["--head", "--port", str(port), "--include-dashboard=false"],
                         ["--address", f"127.0.0.1:{port}"]):
                subprocess.run([ray_cli, "start", *args, *common], check=True, capture_output=True, text=True, env=env)
        except subprocess.CalledProcessError as exc:
            subprocess.run([ray_cli, "stop", "--force"], capture_output=True, env=env)
            raise SystemExit(f"FAILED: ray start {' '.join(exc.cmd[2:4])}: {exc.stderr.strip().splitlines()[-1]}")
        cmd += ["--executor", "ray", "--address", f"127.0.0.1:{port}"]
    print("running:", " ".join(cmd), flush=True)
    try:
        with Timer() as timer:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    finally:
        if started_cluster:
            subprocess.run([ray_cli, "stop", "--force"], capture_output=True, env=env)
    if proc.returncode != 0:
        print(proc.stdout[-3000:])
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"FAILED: `transferlab run --executor {executor}` exited with {proc.returncode}")
    # ru_maxrss of the children is the largest single child: the driver (local) or the largest worker (Ray).
    return {"executor": executor, "seconds": timer.seconds, "out": out,
            "peak": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}


def same_tables(a: Path, b: Path) -> bool:
    for name in TABLES:
        left, right = pd.read_csv(a / name), pd.read_csv(b / name)
        columns = [c for c in left.columns if c not in ("duration_s", "images_per_second")]
        if not left[columns].equals(right[columns]):
            return False
    return True


def bench_executors(args) -> str:
    executors = [e.strip() for e in args.executor.split(",") if e.strip()]
    unknown = sorted(set(executors) - set(EXECUTORS))
    if unknown:
        raise SystemExit(f"unknown --executor {', '.join(unknown)}; use {', '.join(EXECUTORS)}")
    rows, results = [], []
    with tempfile.TemporaryDirectory(prefix="bench-study-") as scratch:
        scratch = Path(scratch)
        for executor in executors:
            # A cold canvas cache for each run, and one torch thread per Ray step (Ray sets it per task);
            # the local run keeps one thread per core, as a user gets it.
            # RAY_AUTH_MODE the same for the head, the second node and the driver (Ray 2.60 turns tokens on for
            # `ray start --head` only, unless told): see README, "Running on a cluster".
            env = dict(os.environ, TRANSFERLAB_CACHE=str(scratch / f"cache-{executor}"), RAY_USAGE_STATS_ENABLED="0",
                       RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "token"))
            results.append(run_once(args.study, executor, scratch, args.device, env))
        base = results[0]
        for r in results:
            equal = "—" if r is base else ("yes" if same_tables(base["out"], r["out"]) else "no (threads differ)")
            met = ""
            if r["executor"] == "local":
                met = "yes" if r["seconds"] <= TARGET_SECONDS and r["peak"] <= TARGET_BYTES else "NO"
            rows.append([r["executor"], f"{r['seconds']:.1f} s", f"{r['peak'] / 1024**3:.2f} GB",
                         f"{base['seconds'] / r['seconds']:.2f}x", equal, met])
    study = args.study.relative_to(ROOT) if args.study.is_relative_to(ROOT) else args.study
    return "\n".join([
        f"CPU: {cpu_model()}, {cores()} cores; study: {study} (cold cache)",
        "",
        table(["executor", "wall time", "peak RSS (largest process)", f"vs {base['executor']}",
               f"tables equal {base['executor']}'s", f"local target <= {TARGET_SECONDS} s, <= 1.5 GB"], rows),
    ])


# ---------------------------------------------------------------- 2. the reference grid on paper
def greedy_makespan(steps, cost: dict[str, float], workers: int) -> float:
    """A list schedule on ``workers`` devices: a step starts when its inputs are done and a device is free."""
    finish = {}
    for s in steps:  # plan order is dependency order
        finish[s.id] = cost[s.id] + max((finish[i] for i in s.inputs), default=0.0)
    free = [0.0] * workers
    done = {}
    for s in sorted(steps, key=lambda s: finish[s.id] - cost[s.id]):
        ready = max((done[i] for i in s.inputs), default=0.0)
        start = max(ready, heapq.heappop(free))
        done[s.id] = start + cost[s.id]
        heapq.heappush(free, done[s.id])
    return max(done.values(), default=0.0)


def reference_estimate(args) -> str:
    """The dry run's estimate (transferlab.study.estimate: image passes x seconds per image timed on this machine),
    by step kind, with and without the compute-once paths, and scheduled on ``--workers`` devices."""
    from transferlab.study import load_study, plan
    from transferlab.study.estimate import estimate

    study = load_study(args.reference)
    steps = plan(study, Path(tempfile.mkdtemp(prefix="bench-plan-")))
    found = estimate(steps, {}, study)
    kinds = pd.Series({s.id: s.kind for s in steps})
    hours = lambda x: f"{x / 3600:,.1f} h"  # noqa: E731
    by_kind = pd.DataFrame({"after": pd.Series(found.after), "before": pd.Series(found.before)}).groupby(kinds)
    rows = [[kind, len(group), hours(group["before"].sum()), hours(group["after"].sum())]
            for kind, group in by_kind]
    estimates = []
    for label, cost in (("without the compute-once paths", found.before), ("with them (today)", found.after)):
        serial = sum(cost.values())
        critical, makespan = found.critical(cost is found.before), greedy_makespan(steps, cost, args.workers)
        estimates.append([label, hours(serial), hours(critical), hours(makespan), f"{serial / makespan:.1f}x"])
    return "\n".join([
        f"CPU: {cpu_model()}, {cores()} cores; plan: {args.reference.relative_to(ROOT)} ({len(steps)} steps); "
        f"timed on {found.where}; {len(found.unknown)} steps not estimated",
        "",
        table(["step kind", "steps", "modelled time, old paths", "modelled time, compute once"], rows),
        "",
        table(["paths", "serial", "critical path", f"greedy on {args.workers} devices", "speed-up"], estimates),
    ])


def main(argv=None) -> int:
    args = parse_args(argv)
    parts = []
    if not args.no_run:
        parts.append(bench_executors(args))
    parts.append(reference_estimate(args))
    printed = "\n\n".join(parts)
    finish("bench/study.py", printed, not args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
