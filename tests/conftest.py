"""Test-wide settings: the two tiers, and every cache and data root inside a temporary folder.

Tiers (CONTRIBUTING.md): plain `pytest` runs the fast tier, every test without a FULL_SUITE_ONLY marker;
`pytest --all` runs everything (the README's test command, run by .ci/run). A `-m` or `-k` expression, or
a test file or test id named on the command line, selects by itself: `pytest tests/test_ray.py` runs the
Ray tests, `pytest -m slow` the slow ones.
"""

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from transferlab import config

# The step budget (600 optimizer steps by default) would turn the suite's one-epoch fits on a few
# hundred images into a hundred epochs each. Tests train exactly the epochs they ask for; the
# budget's own tests set min_steps explicitly (tests/test_training.py).
config.DEFAULT_MIN_STEPS = 0

# pytest-xdist's workers (-n N) set COLUMNS=80: the CLI's console would wrap its tables at 80 columns where a plain
# pytest run, piped, gets 160 (transferlab.terminal). Tests see what a piped run sees either way.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.pop("COLUMNS", None)

# Markers whose tests run only in the full suite (registered with their meaning in pyproject.toml).
FULL_SUITE_ONLY = ("slow", "ray")


def pytest_addoption(parser):
    parser.addoption("--all", action="store_true", dest="all_tiers",
                     help="run the full suite: also the tests marked " + ", ".join(FULL_SUITE_ONLY))


def _named_files(config) -> set[Path]:
    """The test files named on the command line (a folder, the default testpaths included, names none)."""
    here = config.invocation_params.dir
    paths = {(here / arg.split("::")[0]).resolve() for arg in config.args}
    return {p for p in paths if p.is_file()}


# The longest test files, longest first (`pytest --all --durations=0` on 2 quiet cores). pytest-xdist hands out whole
# files (--dist loadfile) in collection order (--no-loadscope-reorder); started first, a long file runs beside the
# many short ones, where started last it would leave the other workers idle at the end.
LONGEST_FIRST = (
    "test_trust_threads.py", "test_readme_results.py", "test_ray.py", "test_ray_cluster.py", "test_trust_ray.py",
    "test_study.py",
)


def _longest_first(items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise


def pytest_collection_modifyitems(config, items):
    _longest_first(items)
    if config.getoption("all_tiers") or config.option.markexpr or config.option.keyword:
        return
    named = _named_files(config)
    keep, full_only = [], []
    for item in items:
        marked = any(item.get_closest_marker(m) for m in FULL_SUITE_ONLY)
        (full_only if marked and item.path.resolve() not in named else keep).append(item)
    if full_only:
        config.hook.pytest_deselected(items=full_only)
        items[:] = keep


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject's addopts): one worker per usable core, at most 4. Each worker imports torch and trains
    its own fixtures (about 1 GB), and the suite's longest test files bound the wall time beyond 4 workers."""
    from transferlab.machine import usable_cores

    return max(1, min(4, len(usable_cores())))


def pytest_report_header(config):
    if not (config.getoption("all_tiers") or config.option.markexpr or config.option.keyword):
        return f"fast tier: tests marked {' / '.join(FULL_SUITE_ONLY)} are deselected (--all runs them too)"
    return None


@pytest.fixture(autouse=True, scope="session")
def isolated_dirs(tmp_path_factory):
    # The canvas cache is shared across tests (it only speeds things up), the data root is empty:
    # no test may depend on real data sets or on what an earlier run left in ~/.cache. Session scope, so
    # that the module and session fixtures which train (before any function fixture) are isolated too;
    # a test that sets these with monkeypatch gets them back afterwards.
    base = tmp_path_factory.getbasetemp()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRANSFERLAB_CACHE", str(base / "canvas-cache"))
        patch.setenv("TRANSFERLAB_DATA", str(base / "empty-data-root"))
        yield


@dataclass(frozen=True)
class DoneStudy:
    """A study that has run to the end: its file, its output folder, and what run_study returned."""
    study: Path
    out: Path
    outcome: object  # transferlab.study.StudyOutcome

    def copy_to(self, folder: Path) -> tuple[Path, Path]:
        """A private copy (study file, output folder) under ``folder``: a test changes the copy, never this."""
        folder.mkdir(parents=True, exist_ok=True)
        study = folder / self.study.name
        shutil.copyfile(self.study, study)
        out = folder / "out"
        shutil.copytree(self.out, out)
        return study, out


@pytest.fixture(scope="session")
def tiny_study_done(tmp_path_factory) -> DoneStudy:
    """tests/test_study.py's TINY study run once per session (19 steps). A copied output folder is a finished
    study wherever it lies (nothing in it names its own path), so tests that resume, extend or rebuild a
    finished study start from ``copy_to(tmp_path)`` instead of training it again."""
    from test_study import TINY, write_study
    from transferlab.study import StudyRunOptions, run_study

    folder = tmp_path_factory.mktemp("tiny-study-done")
    study = write_study(folder, TINY)
    outcome = run_study(study, folder / "out", StudyRunOptions(progress=False))
    return DoneStudy(study, folder / "out", outcome)


@pytest.fixture(autouse=True, scope="session")
def fixed_thread_count():
    """OMP_NUM_THREADS set to what the process would use anyway (one thread per usable core), unless already set:
    on a busy machine a calibration that measured contention switches a process to one thread unless the user
    chose a count, and a module fixture that calibrated outside every test's no_contention_switch left the whole
    session on one thread, so the session's tiny study planned one thread and the tests resuming it (planning
    two) trained it again (four test_study failures at load average 6); subprocesses inherit the count too.
    Tests of the default policy delete the variable themselves."""
    from transferlab.machine import default_thread_count

    with pytest.MonkeyPatch.context() as patch:
        if not os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
            # pytest-xdist's workers (-n N) share the cores: each computes on its share, as N programs should.
            workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
            threads = max(1, default_thread_count() // workers)
            patch.setenv("OMP_NUM_THREADS", str(threads))
            if "torch" in sys.modules:  # torch read the variable when it started
                sys.modules["torch"].set_num_threads(threads)
        yield


@pytest.fixture(autouse=True)
def no_contention_switch(monkeypatch):
    """A test machine is often busy: a calibration that measured one thread beating two would switch the rest of
    the test process to one thread, and later tests would see another thread count than they set up. Each test
    starts without that switch and without the once-per-process probe; tests/test_calibration_contention.py sets
    both itself to test them."""
    from transferlab import device  # torch: every test that could calibrate has imported it already

    monkeypatch.setattr(device, "_contention_threads", None)
    monkeypatch.setattr(device, "_contention_probed", True)
