"""Small helpers shared by the tests: run the CLI in-process and capture what a user would see."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from transferlab.cli import main


def run_cli(args, capsys) -> tuple[int, str, str]:
    """Run ``transferlab ARGS`` in this process; return (exit code, stdout, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    code = exit_info.value.code
    return (0 if code is None else code), out, err


def assert_user_error(args, capsys, *fragments) -> str:
    """The command fails as bad input: exit 2, one line on stderr naming the problem, no traceback."""
    code, out, err = run_cli(args, capsys)
    assert code == 2, (code, out, err)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def user_module(tmp_path, monkeypatch, prefix: str, source: str):
    """Write ``source`` as an importable module under ``tmp_path``; yield its name, forget it afterwards."""
    name = f"{prefix}_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def functions(path: Path):
    """(Qualified.name, node, enclosing node) for every function and method of one module, nested ones too: what
    the code-shape tests (function length, parameter count) measure."""
    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    yield name, child, node
                yield from visit(child, f"{name}.")
            else:
                yield from visit(child, prefix)

    yield from visit(ast.parse(Path(path).read_text(encoding="utf-8")), "")
