"""Test-wide settings: keep every cache and data root inside a temporary folder."""

import pytest


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path_factory, monkeypatch):
    # The canvas cache is shared across tests (it only speeds things up), the data root is empty:
    # no test may depend on real data sets or on what an earlier run left in ~/.cache.
    base = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("TRANSFERLAB_CACHE", str(base / "canvas-cache"))
    monkeypatch.setenv("TRANSFERLAB_DATA", str(base / "empty-data-root"))
