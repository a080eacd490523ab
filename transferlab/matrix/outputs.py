"""Where an attack matrix writes, and the rule that one matrix never replaces another's results.

``attack-matrix``'s tables (cells.csv, matrix.json, the figures) describe exactly the runs and attack settings
of the command that wrote them: a second command with other attacks into the same folder used to rewrite
them, and the first command's results were gone. Two rules keep every result:

- the default output folder is named after the inputs that most often differ between two commands (the
  dataset and the attacks), so the README's examples, run in sequence, write to two folders;
- into a folder that already holds a matrix, a command may only *add* (more eps, sources, targets, attacks,
  the same command again: its cells are a superset of the old ones); one that would drop any old cell is
  refused with a one-line error naming ``--out`` and ``--force``.
"""

from __future__ import annotations

import json
from pathlib import Path

from transferlab.errors import UserError
from transferlab.names import slug

MATRIX_PARENT = Path("results/matrix")
# What every cell of a matrix was computed under: a change in any of these changes every cell.
CONDITIONS = ("dataset", "samples", "seed", "label_policy", "scope", "precision")


def default_out(dataset: str, attack_names: list[str], parent: Path = MATRIX_PARENT) -> Path:
    """``results/matrix/<dataset>-<attack>[-<attack>...]``: ``mnist-pgd-fgsm``, ``mnist-torchattacks-APGD``."""
    parts = [slug(dataset)] + [slug(str(a).replace(":", "-")) for a in attack_names]
    return Path(parent) / "-".join(parts)


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _setting_records(settings) -> set[str]:
    return {_canonical({"attack": s["attack"], "eps": round(float(s["eps"]), 9), "params": s["params"]})
            for s in settings}


def dropped_by(previous: dict, spec) -> list[str]:
    """What of ``previous`` (a matrix.json) a matrix for ``spec`` would not reproduce, in words; [] if nothing."""
    new = {"dataset": spec.dataset, "samples": spec.samples, "seed": spec.seed, "label_policy": spec.label_policy,
           "scope": spec.scope, "precision": spec.precision}
    lost = [f"{key} {previous.get(key)!r} -> {new[key]!r}" for key in CONDITIONS
            if key in previous and _canonical(previous[key]) != _canonical(new[key])]
    if previous.get("white_box") and not spec.white_box:
        lost.append("the white-box cells")
    old_settings = _setting_records(previous.get("attacks", []))
    now = _setting_records({"attack": s.name, "eps": s.eps, "params": json.loads(_canonical(s.params))}
                           for s in spec.settings)
    if old_settings - now:
        lost.append(f"{len(old_settings - now)} attack setting(s)")
    for role, paths in (("sources", spec.sources), ("targets", spec.targets)):
        missing = {str(Path(p)) for p in previous.get(role, [])} - {str(Path(p)) for p in paths}
        if missing:
            lost.append(f"{role} {', '.join(sorted(Path(p).name for p in missing))}")
    return lost


def check_no_clobber(spec, force: bool = False) -> None:
    """Refuse (UserError) to write ``spec``'s matrix where another matrix's results would be dropped."""
    record = Path(spec.out_dir) / "matrix.json"
    if force or not record.is_file():
        return
    try:
        previous = json.loads(record.read_text())
    except (OSError, ValueError):
        return  # a damaged record describes nothing to keep; the merge rewrites it
    lost = dropped_by(previous, spec) if isinstance(previous, dict) else []
    if lost:
        raise UserError(f"{spec.out_dir} holds another attack matrix's results, which this one would replace "
                        f"({'; '.join(lost)}); choose another --out, or pass --force to replace them")
