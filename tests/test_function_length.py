"""No function in transferlab/ is over 60 lines (from its first decorator to its last line, docstring
included): a longer one is split into named steps that read top to bottom (issue 25, STYLE.md section 4)."""

from pathlib import Path

import transferlab
from helpers import functions

PACKAGE = Path(transferlab.__file__).resolve().parent
MAX_LINES = 60
# Functions allowed to stay longer, each with its reason. Empty: every function fits.
ALLOWED: set[str] = set()


def function_lengths(path: Path, where: str | None = None) -> dict[str, int]:
    """'file:Qualified.name' -> lines, for every function and method in one module (nested ones too)."""
    where = where or path.relative_to(PACKAGE.parent).as_posix()
    return {f"{where}:{name}": node.end_lineno - min([node.lineno] + [d.lineno for d in node.decorator_list]) + 1
            for name, node, _ in functions(path)}


def all_lengths() -> dict[str, int]:
    lengths = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        lengths.update(function_lengths(path))
    return lengths


def test_no_function_over_60_lines():
    too_long = {name: n for name, n in all_lengths().items() if n > MAX_LINES and name not in ALLOWED}
    assert not too_long, "functions over 60 lines (split them into named steps): " + ", ".join(
        f"{name} ({n} lines)" for name, n in sorted(too_long.items()))


def test_allow_list_is_not_stale():
    # An allowed function that was split (or renamed) leaves the list, so the list only shrinks.
    lengths = all_lengths()
    stale = sorted(name for name in ALLOWED if lengths.get(name, 0) <= MAX_LINES)
    assert not stale, f"no longer over 60 lines, remove from ALLOWED: {stale}"


def test_the_count_sees_decorators_docstrings_and_methods(tmp_path):
    module = tmp_path / "probe.py"
    body = "\n".join(f"        x{i} = {i}" for i in range(57))
    module.write_text(f'import functools\nclass C:\n    @functools.cache\n    def f(self):\n        """doc"""\n{body}\n'
                      f'        return 1\n\n    def g(self):\n        return 2\n')
    # decorator + def + docstring + 57 lines + return = 61: one over the limit
    assert function_lengths(module, "probe.py") == {"probe.py:C.f": 61, "probe.py:C.g": 2}
