"""Evaluation: one result file per (adversarial set, evaluated model) holding per-sample correctness, clean and
adversarial; fine-tunes sharing a frozen prefix by content are scored in one pass of it."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch

from transferlab import store
from transferlab.matrix.craft import Crafting
from transferlab.matrix.spec import AttackSetting, Member


class Evaluation(Crafting):
    """A matrix's per-(set, model) results (phase 4)."""

    # ---------------------------------------------------------------- results
    def result_path(self, crafter: Member, setting: AttackSetting, member: Member) -> Path:
        return self.out_dir / "correct" / self.set_id(crafter, setting) / f"{member.name}.safetensors"

    def result_key(self, crafter: Member, setting: AttackSetting, member: Member) -> str:
        return store.content_key({"set": self.set_key(crafter, setting), "model": member.weights_sha256,
                                  "precision": self.spec.precision, "reference": self.reference_kind(member)})

    def load_result(self, crafter: Member, setting: AttackSetting, member: Member):
        """(metadata, adversarial correctness, clean correctness) from disk, or None when absent or damaged."""
        path = self.result_path(crafter, setting, member)
        if not path.is_file():
            return None
        loaded = store.load_checked_tensors(path, "matrix cache file",
                                            expect={"key": self.result_key(crafter, setting, member)})
        if loaded is None:
            return None
        tensors, metadata = loaded
        samples = self.spec.samples
        if set(tensors) != {"adversarial_correct", "clean_correct"} or any(
                t.dtype != torch.uint8 or tuple(t.shape) != (samples,) or bool((t > 1).any())
                for t in tensors.values()):
            warnings.warn(f"matrix cache file {path} holds results of the wrong shape or type; evaluating again",
                          stacklevel=2)
            return None
        return metadata, tensors["adversarial_correct"].bool(), tensors["clean_correct"].bool()

    def evaluate(self, crafter: Member, setting: AttackSetting, member: Member,
                 adversarial: torch.Tensor | None = None):
        """Score ``member`` on ``crafter``'s set (crafting or reading it if not given) and save the result."""
        found = self.load_result(crafter, setting, member)
        if found is not None:
            return found
        if adversarial is None:
            adversarial = self.adversarial(crafter, setting)
        t0 = time.perf_counter()
        found = self._save_result(crafter, setting, member, self.predict(member, adversarial))
        self.eval_seconds += time.perf_counter() - t0
        return found

    def evaluate_many(self, crafter: Member, setting: AttackSetting, members: list[Member],
                      adversarial: torch.Tensor | None = None) -> list:
        """``evaluate`` for several members on one set: those fine-tuned from one source with equal frozen
        tensors share their prefix (predict_many). Same files and results as evaluating each alone."""
        results = {m.name: self.load_result(crafter, setting, m) for m in members}
        missing = [m for m in members if results[m.name] is None]
        if missing:
            if adversarial is None:
                adversarial = self.adversarial(crafter, setting)
            t0 = time.perf_counter()
            self._share_clean(missing)
            for member, predicted in zip(missing, self.predict_many(missing, adversarial)):
                results[member.name] = self._save_result(crafter, setting, member, predicted)
            self.eval_seconds += time.perf_counter() - t0
        return [results[m.name] for m in members]

    def _save_result(self, crafter: Member, setting: AttackSetting, member: Member, predicted: torch.Tensor):
        reference, clean_ok = self.clean(member)
        adv_ok = predicted == reference
        metadata = {"key": self.result_key(crafter, setting, member), "crafter": crafter.name,
                    "evaluated": member.name, "reference_labels": self.reference_kind(member),
                    "label_policy": self.policy(crafter),
                    "craft_numerics": store.json_compact(self._set_numerics[(crafter.weights_sha256, setting.name,
                                                                             setting.eps)]),
                    "eval_numerics": store.json_compact(self.numerics(member).record())}
        store.save_checked_tensors(self.result_path(crafter, setting, member), {
            "adversarial_correct": adv_ok.to(torch.uint8).cpu(), "clean_correct": clean_ok.to(torch.uint8).cpu()},
            metadata=metadata)
        return metadata, adv_ok.cpu(), clean_ok.cpu()
