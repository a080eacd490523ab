"""Study files: validation, planning with content keys, resume after a kill, the lock, and --dry-run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from filelock import FileLock

from helpers import assert_user_error, run_cli
from transferlab.study import StudyRunOptions, load_study, plan, run_study

TINY = """
[study]
name = "tiny"
seeds = [0]
device = "cpu"

[data]
download = false

[train]
epochs = 1
batch_size = 64
min_steps = 0               # subprocess runs do not see conftest's lowered default

[[pretrain]]
name = "k"
model = "mlp"
dataset = "kmnist-sample"
n = 400

[[pretrain]]
name = "f"
model = "mlp"
dataset = "fmnist-sample"
n = 400

[[finetune]]
from = ["k", "f"]
dataset = "mnist-sample"
n = [200, 400]
freeze = [2]
epochs = 2

[[attack]]
attack = "fgsm"
eps = [0.1, 0.2]

[evaluation]
samples = 100
white_box = false
"""


def write_study(tmp_path: Path, text: str = TINY, name: str = "study.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_plan_expands_lists_and_keys_are_stable(tmp_path):
    study = load_study(write_study(tmp_path))
    steps = plan(study, tmp_path / "out")
    kinds = [s.kind for s in steps]
    assert kinds.count("pretrain") == 2 and kinds.count("finetune") == 2 * 2
    # The matrix: a set per (source, eps), an evaluation per (source, evaluated model) where the two fine-tunes
    # of one source and freeze share one (their frozen prefix is computed once), one merge.
    assert kinds.count("craft") == 2 * 2 and kinds.count("eval") == 2 * 4 and kinds.count("merge") == 1
    assert [s.key for s in plan(load_study(write_study(tmp_path)), tmp_path / "out")] == [s.key for s in steps]

    # Changing one fine-tune option changes only the fine-tunes and what depends on them: their evaluations
    # and the merge, not the sources' crafted sets.
    changed = plan(load_study(write_study(tmp_path, TINY.replace("epochs = 2", "epochs = 3"))), tmp_path / "out")
    differ = {a.id for a, b in zip(steps, changed) if a.key != b.key}
    assert differ == {s.id for s in steps if s.kind in ("finetune", "merge") or (s.kind == "eval" and "final:" in s.id)}
    # Changing one pretrain changes it, its fine-tunes and the matrix, not the other source.
    changed = plan(load_study(write_study(tmp_path, TINY.replace("n = 400\n\n[[pretrain]]", "n = 300\n\n[[pretrain]]"))),
                   tmp_path / "out")
    differ = {a.id for a, b in zip(steps, changed) if a.key != b.key}
    assert "pretrain/k/s0" in differ and "pretrain/f/s0" not in differ
    assert all("/f/" not in d for d in differ if d.startswith("finetune"))


SCRATCH = TINY.replace("white_box = false", "white_box = true").replace(
    "[[attack]]", '[[scratch]]\nmodel = ["mlp"]\ndataset = "mnist-sample"\nn = [200]\n\n[[attack]]')
# Keys of SCRATCH's steps as the code before the rename to "scratch" computed them (the table was then
# [[baseline]] and the step ids baseline/...): a study that ran then still finds these steps done. (Its merge
# step merges again since its fine-tunes' eval steps became one shared-prefix step: it reads the cached results.)
KEYS_BEFORE_THE_RENAME = {
    "scratch/mlp/mnist-sample200/s0": "07baa9674aba245d",
    "craft/fgsm/scratch:mlp/mnist-sample200/eps0.1/s0": "8ec58173e78ad788",
    "eval/fgsm/pre:k/scratch:mlp/mnist-sample200/s0": "b99bd83914637ee5",
}


def test_scratch_steps_keep_the_keys_they_had_as_baseline_steps(tmp_path):
    steps = plan(load_study(write_study(tmp_path, SCRATCH)), tmp_path / "out")
    keys = {s.id: s.key for s in steps}
    assert {i: keys[i] for i in KEYS_BEFORE_THE_RENAME} == KEYS_BEFORE_THE_RENAME
    assert {s.kind for s in steps} == {"pretrain", "finetune", "scratch", "craft", "eval", "merge"}


def test_a_setting_added_later_changes_only_the_keys_of_steps_that_set_it(tmp_path):
    steps = plan(load_study(write_study(tmp_path, SCRATCH)), tmp_path / "out")
    flipped = plan(load_study(write_study(tmp_path, SCRATCH.replace(
        '[[scratch]]\nmodel = ["mlp"]', '[[scratch]]\naugment_flip = true\nmodel = ["mlp"]'))), tmp_path / "out")
    differ = {a.id for a, b in zip(steps, flipped) if a.key != b.key}
    assert "scratch/mlp/mnist-sample200/s0" in differ
    assert not any(d.startswith(("pretrain/", "finetune/")) for d in differ)
    assert next(s for s in flipped if s.id == "scratch/mlp/mnist-sample200/s0").config["train"]["augment_flip"]


def test_baseline_table_still_loads_as_scratch_with_a_warning(tmp_path, capsys):
    old = SCRATCH.replace("[[scratch]]", "[[baseline]]")
    with pytest.warns(FutureWarning, match=r"\[\[baseline\]\] is now called \[\[scratch\]\]") as caught:
        study = load_study(write_study(tmp_path, old))
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert "baseline" not in study and study["scratch"][0]["model"] == ["mlp"]
    assert [s.key for s in plan(study, tmp_path / "out")] == [
        s.key for s in plan(load_study(write_study(tmp_path, SCRATCH, "new.toml")), tmp_path / "out")]
    # An error in an old entry still names its line.
    bad = old.replace('n = [200]\n\n[[attack]]', 'n = [200]\nepochz = 1\n\n[[attack]]')
    line = bad.splitlines().index("epochz = 1") + 1
    with pytest.warns(FutureWarning):
        assert_user_error(["run", write_study(tmp_path, bad, "bad.toml"), "--dry-run"], capsys, f"line {line}")
    both = SCRATCH + '\n[[baseline]]\nmodel = ["mlp"]\ndataset = "mnist-sample"\n'
    assert_user_error(["run", write_study(tmp_path, both, "both.toml"), "--dry-run"], capsys,
                      "both [[baseline]] and [[scratch]]")


def test_a_merge_of_an_older_table_schema_is_not_done(tmp_path):
    from transferlab.tables import MATRIX_SCHEMA

    merge = next(s for s in plan(load_study(write_study(tmp_path)), tmp_path / "out") if s.kind == "merge")
    merge.output.parent.mkdir(parents=True)
    for schema, done in ((MATRIX_SCHEMA - 1, False), (MATRIX_SCHEMA, True)):
        merge.output.write_text(json.dumps({"step_key": merge.key, "schema": schema}))
        assert merge.is_done() is done


def test_seeds_repeat_every_step(tmp_path):
    study = load_study(write_study(tmp_path, TINY.replace("seeds = [0]", "seeds = [0, 1, 2]")))
    steps = plan(study, tmp_path)
    assert len(steps) == 3 * 19 and len({s.key for s in steps}) == len(steps)


def test_dry_run_runs_nothing(tmp_path, capsys):
    code, out, _ = run_cli(["run", write_study(tmp_path), "--out", tmp_path / "out", "--dry-run"], capsys)
    assert code == 0 and "to do" in out and "nothing was executed" in out
    assert not (tmp_path / "out").exists()


def _run_subprocess(study: Path, out: Path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "transferlab.cli", "run", str(study), "--out", str(out),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


@pytest.mark.slow  # a subprocess (torch import) killed mid-study, then resumed
def test_killed_study_resumes_without_redoing_finished_steps(tmp_path, tiny_study_done):
    study = write_study(tmp_path)
    assert len(tiny_study_done.outcome.executed) == 19

    out = tmp_path / "resumed"
    proc = _run_subprocess(study, out)
    deadline = time.time() + 120
    # Kill it as soon as the second step has finished (the third is then under way).
    while time.time() < deadline and len(list((out / "runs").glob("*/run.json"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished_before = {p.parent.name for p in (out / "runs").glob("*/run.json")}
    assert 2 <= len(finished_before) < 6, "the kill came too late to test resuming"

    resumed = run_study(study, out, StudyRunOptions(progress=False))
    rerun_names = {s.split("/")[1] for s in resumed.executed if s.startswith("pretrain")}
    assert not ({f"pre_{n}_s0" for n in rerun_names} & finished_before)
    assert len(resumed.executed) < 19

    # The tables are identical to the uninterrupted run's.
    for table in ("runs.csv", "matrix/cells.csv", "matrix/lineage.csv"):
        a = pd.read_csv(tiny_study_done.out / table)
        b = pd.read_csv(out / table)
        cols = [c for c in a.columns if c not in ("duration_s", "images_per_second")]
        pd.testing.assert_frame_equal(a[cols], b[cols])
    # No temporary or half-written run directories are left.
    assert not [p for p in (out / "runs").iterdir() if p.name.startswith(".")]

    # A third run has nothing left to do.
    assert run_study(study, out, StudyRunOptions(progress=False)).executed == []


@pytest.mark.slow  # extends the shared finished study (its first user trains it)
def test_adding_an_eps_runs_only_the_new_work(tmp_path, tiny_study_done):
    _, out = tiny_study_done.copy_to(tmp_path)
    folder = out / "matrix" / "s0" / "fgsm"
    before = {p: p.stat().st_mtime_ns for p in folder.glob("*/**/*.safetensors")}
    more = run_study(write_study(tmp_path, TINY.replace("eps = [0.1, 0.2]", "eps = [0.1, 0.2, 0.3]")), out,
                     StudyRunOptions(progress=False))
    # Only the new sets are crafted (2 sources x 1 new eps); evaluations run again but score only the new sets.
    assert [s for s in more.executed if s.startswith("craft/")] == ["craft/fgsm/pre:k/eps0.3/s0",
                                                                     "craft/fgsm/pre:f/eps0.3/s0"]
    assert not [s for s in more.executed if s.split("/")[0] in ("pretrain", "finetune")]
    assert {p: p.stat().st_mtime_ns for p in before} == before  # old sets and results untouched
    after = list(folder.glob("adversarial/*.safetensors"))
    assert len(after) == 6 and len(list(folder.glob("correct/*/*.safetensors"))) == 6 * 6
    info = json.loads((folder / "matrix.json").read_text())
    assert info["crafted"] == 6 and info["reused"] == 0  # every set was crafted once, by its own step
    assert set(pd.read_csv(out / "matrix" / "cells.csv")["eps"]) == {0.1, 0.2, 0.3}


def test_lock_refuses_a_second_concurrent_run(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with FileLock(str(out / ".lock")):
        assert_user_error(["run", write_study(tmp_path), "--out", out], capsys, "another")


@pytest.mark.slow  # the whole study report with its figures
def test_report_command_rebuilds_the_report(tmp_path, capsys, tiny_study_done):
    _, out = tiny_study_done.copy_to(tmp_path)
    (out / "report.md").unlink()
    code, _, _ = run_cli(["report", out, "--format", "md,html,tex"], capsys)
    assert code == 0
    assert (out / "report.md").is_file() and (out / "report.html").is_file() and (out / "report.tex").is_file()
    assert_user_error(["report", out, "--format", "pdf"], capsys, "pdf")
    assert_user_error(["report", tmp_path / "nothing-here"], capsys, "runs.csv")


def test_runs_csv_and_the_report_record_what_each_run_computed_with(tiny_study_done):
    # Run folders are not committed: a committed report must say under which numerics its runs were trained.
    runs = pd.read_csv(tiny_study_done.out / "runs.csv")
    for name, label in zip(runs["name"], runs["numerics"]):
        numerics = json.loads((tiny_study_done.out / "runs" / name / "run.json").read_text())["numerics"]
        threads = numerics["threads"]
        assert label == (f"{numerics['precision']}, {numerics['memory_format']}, "
                         f"{threads} thread{'s' if threads != 1 else ''}")
    report = (tiny_study_done.out / "report.md").read_text()
    assert "| device | numerics |" in report
    assert f"| {runs['numerics'].iloc[0]} |" in report


# ------------------------------------------------------------------ bad input
BAD = [
    ("[study\nname = 'x'", "line 1"),
    (TINY.replace('device = "cpu"', 'device = "cpu"\ncolour = "red"'), "study.colour"),
    (TINY.replace("epochs = 2", 'epochs = "two"'), "epochs"),
    (TINY.replace("n = [200, 400]", "n = []"), "empty"),
    (TINY.replace('name = "f"', 'name = "k"'), "duplicate"),
    (TINY.replace('from = ["k", "f"]', 'from = ["k", "q"]'), "'q'"),
    (TINY.replace('[[attack]]\nattack = "fgsm"', '[[attack]]\nattack = "fgsm"\nsteps = 1.5'), "steps"),
    (TINY.replace("[study]", "[studdy]"), "studdy"),
]


@pytest.mark.parametrize("text,fragment", BAD, ids=[
    "syntax", "unknown-key", "wrong-type", "empty-list", "duplicate-name", "undefined-pretrain", "float-steps",
    "unknown-table"])
def test_malformed_studies_get_one_line_errors(tmp_path, capsys, text, fragment):
    line = assert_user_error(["run", write_study(tmp_path, text), "--out", tmp_path / "out"], capsys, fragment)
    assert "study" in line
    assert not (tmp_path / "out").exists()


def test_unknown_key_names_its_line(tmp_path, capsys):
    text = TINY.replace('device = "cpu"', 'device = "cpu"\ncolour = "red"')
    expected_line = text.splitlines().index('colour = "red"') + 1
    assert_user_error(["run", write_study(tmp_path, text), "--out", tmp_path / "out"], capsys,
                      f"line {expected_line}")


def test_output_inside_the_package_is_refused(tmp_path, capsys):
    import transferlab

    inside = Path(transferlab.__file__).parent / "results"
    assert_user_error(["run", write_study(tmp_path), "--out", inside], capsys, "inside the transferlab package")
    assert not inside.exists()


@pytest.mark.slow  # retrains a run and rescores its cells
def test_a_deleted_run_is_trained_again_with_every_step_that_read_it(tmp_path, tiny_study_done):
    # A fresh clone of results/quick, or a run folder deleted to save space: the retrained model may differ
    # (another machine), so the cells scored on the old one must not stay beside it.
    study, out = tiny_study_done.copy_to(tmp_path)
    shutil.rmtree(out / "runs" / "final_k_mnist-sample200_f2_s0")
    again = run_study(study, out, StudyRunOptions(progress=False))
    assert again.executed[0] == "finetune/k/mnist-sample200/f2/s0"
    evals = [s for s in again.executed if s.startswith("eval/")]
    assert evals and all("final:k/mnist-sample200" in s for s in evals)
    assert not [s for s in again.executed if s.startswith(("pretrain/", "craft/"))]
    assert again.executed[-1] == "merge/fgsm/s0" and len(again.executed) == len(evals) + 2


@pytest.mark.slow  # a source, its fine-tunes and the whole matrix again
def test_only_runs_the_selected_steps_and_force_redoes_dependants(tmp_path, tiny_study_done):
    only = run_study(write_study(tmp_path), tmp_path / "only",
                     StudyRunOptions(only="finetune/k/*200*", progress=False))
    assert only.executed == ["pretrain/k/s0", "finetune/k/mnist-sample200/f2/s0"]  # with what it needs
    study, out = tiny_study_done.copy_to(tmp_path / "finished")
    forced = run_study(study, out, StudyRunOptions(force="pretrain/f/*", progress=False))
    # The source, its fine-tunes, and the whole matrix (a forced merge redoes its folder from scratch).
    assert [s for s in forced.executed if s.split("/")[0] in ("pretrain", "finetune")] == [
        "pretrain/f/s0", "finetune/f/mnist-sample200/f2/s0", "finetune/f/mnist-sample400/f2/s0"]
    assert len([s for s in forced.executed if s.split("/")[0] in ("craft", "eval", "merge")]) == 13  # 4 craft, 8 eval (fine-tunes of one source and freeze share one), 1 merge


@pytest.mark.slow  # crafts and scores an ensemble's sets, then the report
def test_study_ensembles_add_a_crafter_and_keep_other_keys(tmp_path, capsys, tiny_study_done):
    plain = {s.id: s.key for s in plan(load_study(write_study(tmp_path)), tmp_path / "out")}
    text = TINY.replace("white_box = false", 'white_box = false\nensembles = [["k", "f"]]')
    with_ensemble = {s.id: s.key for s in plan(load_study(write_study(tmp_path, text, "e.toml")), tmp_path / "out")}
    changed = {i for i in plain if plain[i] != with_ensemble[i]}
    assert changed == {"merge/fgsm/s0"}  # the ensemble's craft and eval steps are new; only the merge re-keys
    _, out = tiny_study_done.copy_to(tmp_path / "finished")  # the other steps are done: only the ensemble's run
    run_study(write_study(tmp_path, text, "e.toml"), out, StudyRunOptions(progress=False))
    cells = pd.read_csv(out / "matrix" / "cells.csv")
    ensemble_rows = cells[cells["crafted_on_role"] == "ensemble"]
    assert set(ensemble_rows["crafted_on"]) == {"ensemble(pre_k_s0+pre_f_s0)"}
    bad = TINY.replace("white_box = false", 'white_box = false\nensembles = [["k", "nope"]]')
    assert_user_error(["run", str(write_study(tmp_path, bad, "bad.toml")), "--dry-run"], capsys, "nope")


# ------------------------------------------------------------------ norms
L2_ATTACK = '\n[[attack]]\nattack = "pgd"\nnorm = "L2"\neps = [1.5]\nsteps = 2\n'


def test_an_l2_attack_has_its_own_steps_and_leaves_the_linf_keys_alone(tmp_path):
    before = {s.id: s.key for s in plan(load_study(write_study(tmp_path)), tmp_path / "out")}
    steps = plan(load_study(write_study(tmp_path, TINY + L2_ATTACK, "l2.toml")), tmp_path / "out")
    l2 = [s for s in steps if "pgd-L2_k2" in s.id]
    assert {s.kind for s in l2} == {"craft", "eval", "merge"}
    assert all(s.config["attack"]["options"] == {"norm": "L2"} and "norm" not in s.config["attack"] for s in l2)
    assert {s.id: s.key for s in steps if s not in l2} == before
    # Saying norm = "Linf" (any case) is saying nothing: the keys are those of a study that never named a norm.
    linf = TINY.replace('attack = "fgsm"', 'attack = "fgsm"\nnorm = "linf"')
    assert {s.id: s.key for s in plan(load_study(write_study(tmp_path, linf, "linf.toml")), tmp_path / "out")} \
        == before
    # an L2 matrix's folder is not the Linf one's: both can be in one study
    assert {s.output.parent.name for s in l2 if s.kind == "merge"} == {"pgd-L2_k2"}


BAD_NORMS = [
    ('attack = "fgsm"\nnorm = "L3"', "norm", "unknown norm 'L3'"),
    ('attack = "mifgsm"\nnorm = "L2"', "norm", "mifgsm has no L2 form"),
    ('attack = "pgd"\nnorm = "L2"\noptions = { norm = "L2" }', "options", "keep one"),
    ('attack = "fgsm"\nnorm = "L2"\neps = [-1.0]', "eps", "0 or more"),
]


@pytest.mark.parametrize("entry,key,fragment", BAD_NORMS, ids=["unknown", "no-l2-form", "twice", "negative"])
def test_bad_norms_in_a_study_name_their_line(tmp_path, capsys, entry, key, fragment):
    text = TINY.replace('attack = "fgsm"\neps = [0.1, 0.2]', entry + ("" if "eps" in entry else "\neps = [0.5]"))
    line = text.splitlines().index(next(l for l in text.splitlines() if l.startswith(f"{key} ="))) + 1
    assert_user_error(["run", write_study(tmp_path, text), "--dry-run"], capsys, f"attack[0].{key} (line {line})",
                      fragment)


def test_an_linf_eps_above_1_asks_for_l2(tmp_path, capsys):
    text = TINY.replace("eps = [0.1, 0.2]", "eps = [2.0]")
    assert_user_error(["run", write_study(tmp_path, text), "--dry-run"], capsys, "attack[0].eps", "norm=L2")
    assert load_study(write_study(tmp_path, text.replace('attack = "fgsm"', 'attack = "fgsm"\nnorm = "L2"'),
                                  "l2.toml"))["attack"][0]["eps"] == [2.0]


@pytest.mark.slow  # an L2 pgd matrix added to the shared finished study, then its report
def test_a_study_with_an_l2_attack_runs_end_to_end(tmp_path, tiny_study_done):
    _, out = tiny_study_done.copy_to(tmp_path)
    outcome = run_study(write_study(tmp_path, TINY + L2_ATTACK), out, StudyRunOptions(progress=False))
    # Every step of the L2 matrix ran (that the Linf steps keep their keys is the plan test above; whether they
    # run again here also depends on the thread counts this machine's load picks: Step.is_done).
    l2_steps = {s.id for s in outcome.steps if "/pgd-L2_k2/" in s.id}
    assert l2_steps and l2_steps <= set(outcome.executed)
    cells = pd.read_csv(out / "matrix" / "cells.csv")
    assert set(cells["attack"]) == {"fgsm", "pgd-L2"}
    l2 = cells[cells["attack"] == "pgd-L2"]
    assert set(l2["eps"]) == {1.5} and l2["attack_params"].str.contains('"norm":"L2"').all()
    assert l2["adversarial_accuracy"].mean() < l2["clean_accuracy"].mean()
    assert (out / "report.md").is_file()
