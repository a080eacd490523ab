"""The cached precision decisions of device.choose_numerics, in ``<cache dir>/calibration.json``, read without torch.

``transferlab doctor`` lists them (and ``--clear-calibration`` forgets them) without importing torch, which
cost 10-16 s and 900 MB on a busy 2-core machine (issue 24). Measuring a decision stays in device.py.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock

from transferlab.data import default_cache_dir
from transferlab.files import atomic_write_json

CALIBRATION_FILE = "calibration.json"
CALIBRATION_SCHEMA = 1


def describe_decisions(decisions: dict[str, dict], now: datetime | None = None) -> list[tuple[str, ...]]:
    """Rows for ``transferlab doctor``: what was decided, from which timings, how long ago, under what load."""
    now = now or datetime.now(timezone.utc)
    rows = []
    for d in decisions.values():
        try:
            age = _age((now - datetime.fromisoformat(d["created"])).total_seconds())
        except (KeyError, TypeError, ValueError):
            age = "?"
        load = "?" if d.get("load_1min") is None else f"{d['load_1min']} on {d.get('cores', '?')} cores"
        contention = d.get("contention") or {}
        if contention.get("contended"):
            load += f" (contended: 1 thread {contention['one_thread_ms']} ms)"
        rows.append((d.get("model", "?"), d.get("workload", "?"), str(d.get("batch_size", "?")),
                     f"{d['precision']}+{'channels_last' if d['channels_last'] else 'contiguous'}"
                     + (" provisional" if d.get("provisional") else ""),
                     ", ".join(f"{k} {v}" for k, v in (d.get("step_ms") or {}).items()), age, load))
    return rows


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{max(0, seconds):.0f} s ago"


class CalibrationCache:
    """Decisions of earlier calibrations, in ``<cache dir>/calibration.json``. Optional: a corrupt
    file is ignored (and rewritten at the next decision), an unwritable directory only warns."""

    _memory: dict[str, dict] = {}
    _measured_here: set[str] = set()  # keys this process measured (their provisional decisions hold here)

    def __init__(self, cache_dir: Path | None = None):
        if cache_dir is None:
            cache_dir = default_cache_dir()
        self.path = Path(cache_dir).expanduser() / CALIBRATION_FILE

    def read(self) -> dict[str, dict]:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            warnings.warn(f"ignoring unreadable calibration cache {self.path} ({exc.__class__.__name__}); "
                          f"it will be rewritten", RuntimeWarning, stacklevel=3)
            return {}
        entries = raw.get("decisions") if isinstance(raw, dict) else None
        if not isinstance(entries, dict):
            warnings.warn(f"ignoring malformed calibration cache {self.path}; it will be rewritten",
                          RuntimeWarning, stacklevel=3)
            return {}
        valid = {k: v for k, v in entries.items() if _valid_decision(v)}
        if len(valid) < len(entries):
            warnings.warn(f"ignoring {len(entries) - len(valid)} malformed entries of the calibration cache "
                          f"{self.path}; they will be measured again", RuntimeWarning, stacklevel=3)
        return valid

    def measuring(self):
        """A lock held while a decision is measured; optional like the cache (no lock where it can't be made)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return FileLock(str(self.path) + ".measuring", timeout=600)
        except OSError:
            return contextlib.nullcontext()

    def get(self, key: str, reread: bool = False) -> dict | None:
        """The cached decision for ``key``; a provisional one (measured under contention) only in the process
        that measured it: any other process measures again."""
        memo = self._memory.get(str(self.path), {})
        if key in memo:
            return self._usable(key, memo[key])
        if reread or str(self.path) not in self._memory:
            self._memory[str(self.path)] = {**memo, **self.read()}
        return self._usable(key, self._memory[str(self.path)].get(key))

    def _usable(self, key: str, entry: dict | None) -> dict | None:
        if entry and entry.get("provisional") and key not in self._measured_here:
            return None
        return entry

    def put(self, key: str, decision: dict) -> None:
        self._measured_here.add(key)
        self._memory.setdefault(str(self.path), {})[key] = decision
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(self.path) + ".lock", timeout=30):
                entries = self.read()
                entries[key] = decision
                atomic_write_json(self.path, {"schema": CALIBRATION_SCHEMA, "decisions": entries})
        except Exception as exc:  # noqa: BLE001 - the cache is optional: a full or read-only disk only costs time
            warnings.warn(f"could not write the calibration cache {self.path} ({exc.__class__.__name__}: {exc}); "
                          f"the next run will calibrate again", RuntimeWarning, stacklevel=3)

    def clear(self) -> int:
        """Forget every cached decision (``transferlab doctor --clear-calibration``); returns how many there were."""
        with FileLock(str(self.path) + ".lock", timeout=30):
            count = len(self.read()) if self.path.exists() else 0
            self.path.unlink(missing_ok=True)
        self._memory.pop(str(self.path), None)
        return count

    @classmethod
    def forget_memory(cls) -> None:
        cls._memory.clear()
        cls._measured_here.clear()


def _valid_decision(entry) -> bool:
    return (isinstance(entry, dict) and entry.get("precision") in ("fp32", "bf16")
            and isinstance(entry.get("channels_last"), bool))
