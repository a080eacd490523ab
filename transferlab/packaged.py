"""Study files shipped with transferlab, found by name: ``transferlab run quick``.

``pip install .`` puts the repository's ``studies/*.toml`` under ``<prefix>/share/transferlab/studies``
(setuptools data-files, see pyproject.toml); an editable install or a checkout reads ``studies/`` beside
the package. A path that exists always wins over a packaged name.
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

from transferlab.errors import UserError, suggest


def study_dirs() -> list[Path]:
    """Where packaged studies may live, in the order they are searched."""
    dirs = [Path(__file__).resolve().parent.parent / "studies"]  # a checkout / editable install
    for prefix in dict.fromkeys([sys.prefix, sysconfig.get_config_var("userbase") or "", sys.base_prefix]):
        if prefix:
            dirs.append(Path(prefix) / "share" / "transferlab" / "studies")
    return [d for d in dict.fromkeys(dirs) if d.is_dir()]


def packaged_studies() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder in study_dirs():
        for path in sorted(folder.glob("*.toml")):
            found.setdefault(path.stem, path)
    return found


def resolve_study(path: Path) -> Path:
    """``path`` itself when it exists, else the packaged study of that name (``quick`` or ``quick.toml``)."""
    path = Path(path)
    if path.exists() or path.parent != Path("."):
        return path
    studies = packaged_studies()
    name = path.stem if path.suffix == ".toml" else path.name
    if name in studies:
        return studies[name]
    known = ", ".join(studies) or "none found"
    raise UserError(f"study file {path} not found, and no packaged study is called {name!r}"
                    f"{suggest(name, list(studies))}; packaged studies: {known}")
