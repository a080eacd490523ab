"""The attack matrix: craft once per (model, attack, eps), evaluate every model on every set.

Every cell shares one seeded, stratified sample set of the target data's test split, so
cells are paired and can be compared sample by sample (McNemar). Adversarial sets and
per-sample correctness are cached under the output directory, keyed by content, so a
second run, or one with an extra target, crafts nothing that already exists.

Rows of the result are tidy: one per (crafted-on model, evaluated model, attack, eps, seed), in
cells.csv (columns ``crafted_on`` / ``evaluated``, each with its ``*_role``: pretrained, finetuned,
scratch or ensemble), lineage.csv (per fine-tune: the model it was fine-tuned from against each other
pretrained model of its architecture) and pairs.csv (transfer predictors per crafted-on / evaluated pair).

A matrix is (1) a spec, (2) a sample set, (3) crafted sets, (4) per-(set, model) results and per-pair
predictors, (5) merged tables; one module a phase, each building on the one before:

- ``spec``: the runs (Member, MatrixRuns), attack settings (AttackRequest, resolved into AttackSetting) and
  sample set (MatrixSpec, make_spec), the result type;
- ``outputs``: where a matrix writes by default, and the rule that one never replaces another's results;
- ``members``: the state every phase shares (runs, data, models with their numerics, clean predictions);
- ``craft``, ``evaluate``, ``pairs``, ``merge``: phases 3 to 5, as the Matrix class's layers;
- ``run``: run_matrix, every phase in this process.

Phases 3 and 4 write one file per unit of work, so a study runs each unit as its own step on any worker
that sees the output folder (transferlab.study), while run_matrix runs them all in one process; both leave
the same files and the same tables.
"""

from transferlab.matrix.merge import Matrix
from transferlab.matrix.run import run_matrix
from transferlab.matrix.spec import (AttackRequest, AttackSetting, MatrixResult, MatrixRuns, MatrixSpec, Member,
                                     make_spec, select_runs, spec_from_keywords)

__all__ = ["AttackRequest", "AttackSetting", "Matrix", "MatrixResult", "MatrixRuns", "MatrixSpec", "Member",
           "make_spec", "run_matrix", "select_runs", "spec_from_keywords"]
