"""The merge: the tidy tables (cells.csv, lineage.csv, pairs.csv), the example images, sample_set.json and
matrix.json, from the files the phases wrote (anything missing or damaged is computed here)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import torch

from transferlab import predictors, stats, store
from transferlab.matrix.pairs import Pairs
from transferlab.matrix.spec import AttackSetting, MatrixResult, Member
from transferlab.tables import CELL_COLUMNS, LINEAGE_COLUMNS, MATRIX_SCHEMA, integer_columns


class Matrix(Pairs):
    """One attack matrix on disk, every phase: members and data (MatrixCore), crafted sets (Crafting), results
    (Evaluation), predictor pairs (Pairs) and the merge here. A study runs each phase's units as their own steps
    (transferlab.study); :func:`transferlab.matrix.run.run_matrix` runs them all in one process."""

    # ---------------------------------------------------------------- merge
    def _pairs_table(self, crafters) -> pd.DataFrame:
        """One row per (crafted_on, evaluated, attack, eps, seed), the keys of a cell: pairs.csv joins the cells
        one to one, and the tables of a study's attack folders add up without repeating a pair."""
        pair_rows = {(c.name, m.name): self.pair(c, m) for c in crafters for m in self.scope_of(c)}
        return pd.DataFrame([{**pair_rows[c.name, m.name], "attack": s.name, "eps": s.eps}
                             for c in crafters for s in self.spec.settings for m in self.scope_of(c)],
                            columns=predictors.PAIR_COLUMNS)

    def _write_examples(self, crafters) -> Path | None:
        """The first images of up to 12 sources' sets of the last setting (always kept on disk), or None."""
        spec = self.spec
        example_sets = {c.name: self.adversarial(c, spec.settings[-1], count=False)[:spec.examples].cpu()
                        for c in [c for c in crafters if c.listed_as == "source"][:12]}
        if not example_sets:
            return None
        examples_file = self.out_dir / "examples.safetensors"
        tensors = {"clean": self.clean_images[:spec.examples].cpu()}
        tensors.update({f"adv/{name}": t for name, t in example_sets.items()})
        store.atomic_save_tensors(examples_file, tensors, metadata={
            "attack": spec.settings[-1].name, "eps": str(spec.settings[-1].eps)})
        return examples_file

    def merge(self, record: dict | None = None) -> MatrixResult:
        """Cells, lineage, pairs, examples, sample_set.json and matrix.json from the files the phases wrote
        (anything missing or damaged is computed here, with a warning from the check that found it)."""
        started = time.perf_counter()
        spec = self.spec
        canvas = self.validate()
        sources, targets = self.sources(), self.targets()
        crafters = self.crafters()
        images_u8, labels, index, fingerprint = self.sample_set()
        rows, per_sample, applied_policy = [], {}, {}
        craft_records, eval_records, reference_kinds = {}, {}, {}
        for crafter in crafters:
            applied_policy[crafter.name] = self.policy(crafter)
            for setting in spec.settings:
                set_id = self.set_id(crafter, setting)
                for member in self.scope_of(crafter):
                    metadata, adv_ok, clean_ok = self.evaluate(crafter, setting, member)
                    craft_record, eval_record = json.loads(metadata["craft_numerics"]), json.loads(metadata["eval_numerics"])
                    craft_records.setdefault(crafter.name, craft_record)
                    eval_records.setdefault(member.name, eval_record)
                    reference_kinds[member.name] = metadata["reference_labels"]
                    rows.append({**_cell_row(crafter, member, setting, spec.seed, set_id, metadata, clean_ok, adv_ok),
                                 "craft_numerics": _numerics_label(craft_record),
                                 "eval_numerics": _numerics_label(eval_record)})
                    per_sample[(crafter.name, member.name, setting.name, setting.eps)] = adv_ok
        pairs = self._pairs_table(crafters)
        cells = integer_columns(pd.DataFrame(rows, columns=CELL_COLUMNS))
        lineage = _lineage_tests(sources, targets, spec.settings, per_sample, spec.seed, spec.samples)
        out_dir = self.out_dir
        store.atomic_write_text(out_dir / "pairs.csv", pairs.to_csv(index=False))
        store.atomic_write_text(out_dir / "cells.csv", cells.to_csv(index=False))
        store.atomic_write_text(out_dir / "lineage.csv", lineage.to_csv(index=False))
        examples_file = self._write_examples(crafters)
        store.atomic_write_json(out_dir / "sample_set.json", {
            "dataset": spec.dataset, "canvas": canvas, "samples": spec.samples, "seed": spec.seed,
            "fingerprint": fingerprint, "test_fingerprint": self.ds.fingerprint("test"), "indices": index.tolist(),
        })
        seconds = time.perf_counter() - started
        # A study's merge step passes the totals of its craft and eval steps (each ran in its own process).
        totals = {"crafted": self.crafted, "reused": self.reused, "craft_seconds": round(self.craft_seconds, 3),
                  "eval_seconds": round(self.eval_seconds, 3), **(record or {})}
        store.atomic_write_json(out_dir / "matrix.json", {
            "schema": MATRIX_SCHEMA, "dataset": spec.dataset, "canvas": canvas, "samples": spec.samples,
            "seed": spec.seed, "label_policy": spec.label_policy, "white_box": spec.white_box, "scope": spec.scope,
            # What was actually applied: the policy per crafter, the labels each evaluated model is scored against,
            # and the precision / memory layout of crafting and of scoring (one decision per model: --precision).
            "label_policy_applied": applied_policy,
            "reference_labels": reference_kinds,
            "precision": spec.precision,
            "numerics": {"crafting": craft_records, "evaluation": eval_records},
            "attacks": [{"attack": s.name, "eps": s.eps, "params": s.params} for s in spec.settings],
            "sources": [str(m.run_dir) for m in sources], "targets": [str(m.run_dir) for m in targets],
            "ensembles": [[str(x.run_dir) for x in m.members] for m in self.ensembles()],
            "seconds": round(seconds, 3), "device": str(self.device), "versions": store.versions(),
            "data_provenance": self.ds.provenance, **totals,
        })
        return MatrixResult(out_dir, cells, lineage, totals["crafted"], totals["reused"], seconds, examples_file,
                            {"craft": totals["craft_seconds"], "eval": totals["eval_seconds"]}, pairs)


def _numerics_label(record: dict) -> str:
    return f"{record['precision']}+{record['memory_format']}"


def _same_pretraining(crafter: Member, evaluated: Member) -> bool:
    return crafter.pretraining_root == evaluated.pretraining_root


def _cell_row(crafter: Member, member: Member, setting: AttackSetting, seed: int, set_id: str, metadata: dict,
              clean_ok: torch.Tensor, adv_ok: torch.Tensor) -> dict:
    """One row of cells.csv but its numerics columns, which merge adds from the records it has parsed already;
    ``metadata``: the evaluation's record (its label policy and reference labels)."""
    n = len(clean_ok)
    clean_correct = int(clean_ok.sum())
    adversarial_correct = int(adv_ok.sum())
    # Success counts only samples the evaluated model got right when clean: a miss it already made is no success.
    flipped = int((clean_ok & ~adv_ok).sum())
    low, high = stats.wilson_interval(adversarial_correct, n)
    dataset_info = member.record.dataset
    return {
        "crafted_on": crafter.name, "evaluated": member.name,
        "crafted_on_dataset": crafter.dataset, "evaluated_dataset": member.dataset,
        "crafted_on_model": crafter.family, "evaluated_model": member.family,
        "crafted_on_pretrain_dataset": crafter.pretrain_dataset, "evaluated_pretrain_dataset": member.pretrain_dataset,
        "crafted_on_role": crafter.role, "evaluated_role": member.role,
        "attack": setting.name, "eps": setting.eps, "steps": setting.params.get("steps"),
        "label_policy": metadata["label_policy"], "reference_labels": metadata["reference_labels"], "seed": seed,
        "samples": n,
        "clean_correct": clean_correct, "clean_accuracy": clean_correct / n,
        "adversarial_correct": adversarial_correct, "adversarial_accuracy": adversarial_correct / n,
        "attack_success_rate": flipped / clean_correct if clean_correct else float("nan"),
        "ci_low": low, "ci_high": high,
        "same_pretraining": _same_pretraining(crafter, member),
        "white_box": crafter.weights_sha256 == member.weights_sha256,
        "evaluated_n": (dataset_info.get("subset") or {}).get("n"),
        "evaluated_freeze": (member.record.freeze or {}).get("n"),
        "attack_params": store.json_compact(setting.params), "adversarial_set": set_id,
    }


def _lineage_tests(sources: list[Member], targets: list[Member], settings: list[AttackSetting],
                   per_sample: dict, seed: int, samples: int) -> pd.DataFrame:
    """For each fine-tuned target: own source's examples vs each other source of the same architecture."""
    rows = []
    for target in targets:
        own = next((s for s in sources if s.weights_sha256 == target.source_sha256), None)
        if own is None:
            continue
        others = [s for s in sources if s is not own and s.family == own.family]
        for setting in settings:
            own_ok = per_sample[(own.name, target.name, setting.name, setting.eps)]
            for other in others:
                other_ok = per_sample[(other.name, target.name, setting.name, setting.eps)]
                test = stats.mcnemar_test(own_ok.numpy(), other_ok.numpy())
                diff = stats.paired_difference(own_ok.numpy(), other_ok.numpy())
                rows.append({
                    "finetuned": target.name, "finetuned_model": target.family, "pretrained_from": own.name,
                    "other_pretrained": other.name, "attack": setting.name, "eps": setting.eps, "seed": seed,
                    "samples": samples, "acc_own": int(own_ok.sum()) / len(own_ok),
                    "acc_other": int(other_ok.sum()) / len(other_ok), "difference": diff["difference"],
                    "diff_ci_low": diff["ci_low"], "diff_ci_high": diff["ci_high"],
                    "own_only_correct": test["a_only"], "other_only_correct": test["b_only"],
                    "mcnemar_statistic": test["statistic"], "mcnemar_p": test["p_value"], "method": test["method"],
                })
    return integer_columns(pd.DataFrame(rows, columns=LINEAGE_COLUMNS))
