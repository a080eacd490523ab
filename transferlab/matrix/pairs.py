"""Transfer predictors per (crafter, evaluated model) pair (transferlab.predictors), one cached file per pair."""

from __future__ import annotations

import warnings
from pathlib import Path

from transferlab import predictors, store
from transferlab.errors import UserError
from transferlab.matrix.evaluate import Evaluation
from transferlab.matrix.members import Kept
from transferlab.matrix.spec import Member
from transferlab.tables import CACHE_SCHEMA, V3_PAIR_NAMES

# A profile is a few MB (reference scale: 5,000 x 784 gradients, 16 MB), kept per process (members.Kept).
_PROFILES = Kept(16)


class Pairs(Evaluation):
    """A matrix's predictor pairs (phase 4, beside the results)."""

    # ---------------------------------------------------------------- predictors
    def pair_path(self, crafter: Member, member: Member) -> Path:
        return self.out_dir / "pairs" / f"{crafter.name}__{member.name}.json"

    def pair(self, crafter: Member, member: Member) -> dict:
        """The transfer predictors of one (crafter, evaluated) pair (transferlab.predictors), cached."""
        path = self.pair_path(crafter, member)
        key = store.content_key({"crafter": crafter.weights_sha256, "evaluated": member.weights_sha256,
                                 "samples": self.sample_set()[3], "labels": self.spec.label_policy,
                                 "precision": self.spec.precision, "schema": CACHE_SCHEMA})
        if path.is_file():
            try:
                cached = store.read_json(path, what="pair file")
            except UserError:
                cached = None
            well_formed = isinstance(cached, dict) and isinstance(cached.get("row"), dict) and "key" in cached
            if well_formed and cached["key"] == key:
                # A pair file written under table schema 3 names the pair source / target.
                return {V3_PAIR_NAMES.get(k, k): v for k, v in cached["row"].items()}
            if not well_formed:  # a stale key (another sample set, precision ...) is a plain miss: no warning
                warnings.warn(f"matrix cache file {path} is damaged or foreign; computing it again", stacklevel=2)

        def profile_of(m: Member):
            own = self.policy(m) == "pred"
            key = (m.weights_sha256, self.sample_set()[3], own, str(self.device), self.spec.batch_size,
                   self.spec.precision)
            return _PROFILES.get(key, lambda: predictors.profile(
                self.model(m), self.clean_images, None if own else self.labels.to(self.device),
                self.spec.batch_size))

        row = {**predictors.pair_row(crafter.name, member.name, profile_of(crafter), profile_of(member),
                                     self.model(crafter), self.model(member)), "seed": self.spec.seed}
        store.atomic_write_json(path, {"key": key, "row": row})
        return row
