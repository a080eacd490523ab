"""The model zoo's catalogue (name, description, options, blocks) without importing torch.

Each family is declared once, by its ``@register(name, description, defaults=..., block_help=...)`` decorator in
models.py, next to its code. ``transferlab models`` only prints those declarations, and importing models.py
means importing torch (7 s and 650 MB on a 2-core machine), so this module reads the decorators' literal
arguments from models.py's source instead of running it. tests/test_settings.py checks that the catalogue is
exactly ``models.list_models()``.
"""

from __future__ import annotations

import ast
from pathlib import Path

MODELS_SOURCE = Path(__file__).with_name("models.py")


def list_families() -> list[dict]:
    """[{name, description, defaults, block_help}] of every ``@register`` in models.py, in declaration order."""
    tree = ast.parse(MODELS_SOURCE.read_text(encoding="utf-8"))
    families = []
    for node in tree.body:
        for decorator in getattr(node, "decorator_list", []):
            if isinstance(decorator, ast.Call) and getattr(decorator.func, "id", None) == "register":
                names = ("name", "description", "defaults", "block_help")
                family = dict(zip(names, (ast.literal_eval(arg) for arg in decorator.args)))
                family.update({k.arg: ast.literal_eval(k.value) for k in decorator.keywords})
                families.append(family)
    return families
