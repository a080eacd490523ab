"""Shared bits of the benches: machine description, versions, table printing, RESULTS.md."""

from __future__ import annotations

import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/x.py` from a checkout
    sys.path.insert(0, str(ROOT))

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
REAL_DATA = Path("/work/shared/datasets/torchvision")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine(device=None) -> str:
    import torch

    text = f"{cpu_model()}, {cores()} cores, {platform.system()} {platform.release()}"
    if device is not None and getattr(device, "type", device) == "cuda":
        text += f"; GPU {torch.cuda.get_device_name(device)}"
    return text


def versions() -> str:
    from transferlab import store

    return ", ".join(f"{k} {v}" for k, v in store.versions().items())


def table(header: list[str], rows: list[list]) -> str:
    """A Markdown table, also readable on a terminal."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def append_results(title: str, command: str, body: str, device=None) -> None:
    """Append a dated section (machine, versions, command, the printed table) to bench/RESULTS.md."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = (f"\n## {title} — {stamp}\n\n"
               f"- machine: {machine(device)}\n- load average at the end (1/5/15 min): {load_average()}\n"
               f"- versions: {versions()}\n- command: `{command}`\n\n{body.rstrip()}\n")
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nEach bench appends a dated section here. See README.md for how to run them.\n")
    with RESULTS.open("a") as f:
        f.write(section)
    print(f"appended to {RESULTS}")


def finish(title: str, printed: str, record: bool, device=None) -> None:
    """Every bench's end: append the printed tables to RESULTS.md (unless --no-record), then print them."""
    if record:
        append_results(title, command_line(), printed, device)
    print()
    print(printed)


def command_line() -> str:
    """The command as typed, with the environment variables that change the numbers."""
    env = [f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES") if k in os.environ]
    return " ".join([*env, "python", *[a if a and " " not in a else repr(a) for a in sys.argv]])


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
