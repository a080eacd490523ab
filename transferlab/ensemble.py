"""Ensemble crafters: adversarial examples crafted on the mean of several sources' logits.

An ensemble is one more row of the attack matrix (role "ensemble", model "ensemble"). Its
pretraining is its members' when they all share one, so a cell counts as "same pretraining"
only if every member descends from the evaluated model's pretrained weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from transferlab import store
from transferlab.errors import UserError
from transferlab.records import RunRecord


class MeanLogits(nn.Module):
    """The mean of the members' logits; gradients flow through every member."""

    def __init__(self, models: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x).float() for m in self.members]).mean(dim=0)


def ensemble_name(members) -> str:
    return "ensemble(" + "+".join(m.name for m in members) + ")"


def make_member(members: list, member_cls):
    """A matrix Member standing for the ensemble of ``members`` (matrix.Member objects)."""
    if len(members) < 2:
        raise UserError("an ensemble needs at least two member runs (e.g. --ensemble 'pre_a,pre_b')")
    classes = {m.record.dataset.get("num_classes") for m in members}
    if len(classes) > 1:
        raise UserError(f"ensemble members have different numbers of classes ({', '.join(map(str, sorted(classes)))}); "
                        f"their logits cannot be averaged")
    # Members with different label spaces (KMNIST and Fashion-MNIST sources) are averaged class index by
    # class index, as the reference's sources were; their label space is then none of the target's, so
    # the "auto" label policy attacks away from the ensemble's own prediction.
    spaces = sorted({m.label_space for m in members})
    canvases = {m.record.dataset["canvas"] for m in members}
    if len(canvases) > 1:
        raise UserError("ensemble members were trained on different canvases")
    roots = {m.pretraining_root for m in members}
    key = store.content_key({"ensemble": sorted(m.weights_sha256 for m in members)})
    datasets = sorted({m.dataset for m in members})
    first = members[0].record
    record = RunRecord(
        kind="ensemble", name=ensemble_name(members), seed=None, freeze={"n": None},
        dataset={**first.dataset, "name": datasets[0] if len(datasets) == 1 else "+".join(datasets),
                 "label_space": "+".join(spaces)},
        model={"family": "ensemble", "members": [m.name for m in members]},
        lineage={"pretrain_dataset": "+".join(sorted({str(m.pretrain_dataset) for m in members}))},
        # A shared root makes the ensemble "same pretraining" with that root's descendants; otherwise none.
        source={"weights_sha256": roots.pop()} if len(roots) == 1 else None,
    )
    return member_cls(Path(members[0].run_dir), record, "ensemble", f"ensemble-{key}", members=list(members))


def resolve(specs: list[str] | None, candidates: list) -> list[list]:
    """'pre_a,pre_b' -> the Members named (or whose run directory is) pre_a and pre_b."""
    groups = []
    by_name = {m.name: m for m in candidates}
    by_path = {str(Path(m.run_dir).resolve()): m for m in candidates}
    for spec in specs or []:
        group = []
        for item in (part.strip() for part in spec.split(",")):
            if not item:
                continue
            member = by_name.get(item) or by_path.get(str(Path(item).resolve()))
            if member is None:
                raise UserError(f"ensemble member {item!r} is not one of the matrix's runs "
                                f"({', '.join(sorted(by_name)) or 'none'}); give it with --sources too")
            group.append(member)
        groups.append(group)
    return groups
