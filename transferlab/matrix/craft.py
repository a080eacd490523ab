"""Crafting: one adversarial set per (crafter, attack setting), keyed by content, read back checked (key,
checksum, shape, eps ball) or crafted and, when kept, saved."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import torch

from transferlab import attacks, store
from transferlab.matrix.members import MatrixCore
from transferlab.matrix.spec import AttackSetting, Member
from transferlab.tables import CACHE_SCHEMA, eps_label


def _set_key(crafter: Member, setting: AttackSetting, policy: str, sample_fingerprint: str, seed: int,
             numerics: str) -> str:
    return store.content_key({
        "schema": CACHE_SCHEMA, "weights": crafter.weights_sha256, "attack": setting.name, "eps": setting.eps,
        "params": setting.params, "labels": policy, "samples": sample_fingerprint, "seed": seed,
        "numerics": numerics,
    })


def _load_cached_set(path: Path, key: str, clean: torch.Tensor, eps: float, norm: str = "Linf"):
    """A cached adversarial set and its metadata, or None (with a warning) when it is damaged, foreign,
    mis-shaped or off its eps ball."""
    loaded = store.load_checked_tensors(path, "adversarial set", expect={"key": key})
    if loaded is None:
        return None
    adversarial = loaded[0].get("adversarial")
    try:
        if adversarial is None or adversarial.dtype != clean.dtype:
            raise attacks.AttackBoundError("no float 'adversarial' tensor")
        attacks.check_eps_ball(clean, adversarial.to(clean.device), eps, norm=norm)
        if eps > 0 and adversarial.shape == clean.shape and torch.equal(adversarial.to(clean.device), clean):
            raise attacks.AttackBoundError("it holds the clean images themselves")  # a set no attack produces
    except attacks.AttackBoundError as exc:
        warnings.warn(f"adversarial set {path} is unusable ({exc}); crafting it again", stacklevel=2)
        return None
    return adversarial.to(clean.device), loaded[1]


class Crafting(MatrixCore):
    """A matrix's crafted sets (phase 3)."""

    # ---------------------------------------------------------------- crafted sets
    def policy(self, crafter: Member) -> str:
        return attacks.choose_label_policy(self.spec.label_policy, crafter.label_space, crafter.dataset,
                                           self.ds.spec.label_space, self.spec.dataset)

    def set_key(self, crafter: Member, setting: AttackSetting) -> str:
        # The precision asked for, not the one a calibration chose: a resumed study keeps what its finished
        # steps used (recorded in every file and row), whichever worker decides next.
        return _set_key(crafter, setting, self.policy(crafter), self.sample_set()[3], self.spec.seed,
                        self.spec.precision)

    def set_id(self, crafter: Member, setting: AttackSetting) -> str:
        return (f"{crafter.name}__{setting.name.replace(':', '-')}_{eps_label(setting.eps, digits=4)}__"
                f"{self.set_key(crafter, setting)}")

    def set_path(self, crafter: Member, setting: AttackSetting) -> Path:
        return self.out_dir / "adversarial" / f"{self.set_id(crafter, setting)}.safetensors"

    @staticmethod
    def _set_ref(crafter: Member, setting: AttackSetting) -> tuple:
        return crafter.weights_sha256, setting.name, setting.eps

    def count_reused(self, crafter: Member, setting: AttackSetting) -> None:
        """A set whose every result is on disk: reused without reading it (a rebuild for the examples uncounts it)."""
        self.reused += 1
        self._reused_sets[self._set_ref(crafter, setting)] = True

    def adversarial(self, crafter: Member, setting: AttackSetting, count: bool = True) -> torch.Tensor:
        """The crafted set: read back (checked: key, checksum, shape, eps ball) or crafted and, if kept, saved.
        ``count``: whether a read counts in ``reused`` (not for the example images); a craft always counts."""
        t0 = time.perf_counter()
        path, key = self.set_path(crafter, setting), self.set_key(crafter, setting)
        found = _load_cached_set(path, key, self.clean_images, setting.eps, setting.norm) if path.is_file() else None
        if found is not None:
            adversarial, metadata = found
            record = json.loads(metadata["numerics"]) if "numerics" in metadata else self.numerics(crafter).record()
            self.reused += count
        else:
            model, policy = self.model(crafter), self.policy(crafter)
            # "pred" labels come from the same predict() the cells are scored with (same precision).
            attack_y = (self.predict(crafter, self.clean_images).to(self.device) if policy == "pred"
                        else self.labels.to(self.device))
            params = dict(setting.params)
            if "seed" in params:  # a constructor seed (APGD, Square, ...) would collide with craft's own
                params["attack_seed"] = params.pop("seed")
            adversarial = self.craft_fn(model, self.clean_images, attack_y, setting.attack, setting.eps,
                                        batch_size=self.spec.batch_size, seed=self.spec.seed,
                                        precision=self.numerics(crafter).precision, **params).detach()
            record = self.numerics(crafter).record()
            if self.keeps_set(crafter):
                store.save_checked_tensors(path, {"adversarial": adversarial}, metadata={
                    "crafter": crafter.name, "attack": setting.name, "eps": str(setting.eps), "norm": str(setting.norm),
                    "label_policy": policy, "samples": self.sample_set()[3], "key": key,
                    "numerics": store.json_compact(record)})
            self.crafted += 1
            if not count and self._reused_sets.pop(self._set_ref(crafter, setting), False):
                self.reused -= 1  # counted as reused (every result on it was on disk), but its file was damaged
        self._set_numerics[self._set_ref(crafter, setting)] = record
        self.craft_seconds += time.perf_counter() - t0
        return adversarial
