"""Wall time and peak memory of the quick study, as a user runs it.

Runs ``transferlab run studies/quick.toml --out <fresh temporary directory>`` in a
subprocess (so nothing is cached from earlier runs, the canvas cache included) and reports
its wall time and peak resident memory (``ru_maxrss`` of the child) against the targets:
under 3 minutes and under 3 GB.

    python bench/study.py
    python bench/study.py --study studies/quick.toml --device cpu
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import ROOT, Timer, append_results, command_line, table

TARGET_SECONDS = 180
TARGET_BYTES = 3 * 1024**3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", type=Path, default=ROOT / "studies" / "quick.toml")
    p.add_argument("--device", default=None, help="override the study's device")
    p.add_argument("--keep", type=Path, default=None, help="keep the results in this directory")
    p.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    return p.parse_args(argv)


def transferlab_command() -> list[str]:
    exe = Path(sys.executable).with_name("transferlab")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "transferlab.cli"]


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-study-") as scratch:
        out = Path(scratch) / "out"
        cmd = transferlab_command() + ["run", str(args.study), "--out", str(out), "--no-progress"]
        if args.device:
            cmd += ["--device", args.device]
        env = dict(os.environ, TRANSFERLAB_CACHE=str(Path(scratch) / "cache"))  # a cold canvas cache
        print("running:", " ".join(cmd), flush=True)
        with Timer() as timer:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
        if args.keep and proc.returncode == 0:
            shutil.copytree(out, args.keep, dirs_exist_ok=True)
    if proc.returncode != 0:
        print(proc.stdout[-3000:])
        print(proc.stderr[-3000:], file=sys.stderr)
        print(f"FAILED: `transferlab run` exited with {proc.returncode} after {timer.seconds:.1f}s")
        return 1

    peak = peak_kib * 1024
    time_ok, memory_ok = timer.seconds < TARGET_SECONDS, peak < TARGET_BYTES
    printed = "\n".join([
        f"study: {args.study.relative_to(ROOT) if args.study.is_relative_to(ROOT) else args.study}"
        + (f", device {args.device}" if args.device else ""),
        "",
        table(["measure", "value", "target", "met"], [
            ["wall time", f"{timer.seconds:.1f} s", f"< {TARGET_SECONDS} s", "yes" if time_ok else "NO"],
            ["peak resident memory", f"{peak / 1024**3:.2f} GB ({peak / 1024**2:,.0f} MiB)", "< 3 GB",
             "yes" if memory_ok else "NO"],
        ]),
    ])
    if not args.no_record:
        append_results("bench/study.py", command_line(), printed)
    print()
    print(printed)
    return 0 if time_ok and memory_ok else 1


if __name__ == "__main__":
    sys.exit(main())
