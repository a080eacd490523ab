"""Test-wide settings: keep every cache and data root inside a temporary folder."""

import pytest

from transferlab import config

# The step budget (600 optimizer steps by default) would turn the suite's one-epoch fits on a few
# hundred images into a hundred epochs each. Tests train exactly the epochs they ask for; the
# budget's own tests set min_steps explicitly (tests/test_training.py).
config.DEFAULT_MIN_STEPS = 0


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path_factory, monkeypatch):
    # The canvas cache is shared across tests (it only speeds things up), the data root is empty:
    # no test may depend on real data sets or on what an earlier run left in ~/.cache.
    base = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("TRANSFERLAB_CACHE", str(base / "canvas-cache"))
    monkeypatch.setenv("TRANSFERLAB_DATA", str(base / "empty-data-root"))
