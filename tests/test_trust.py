"""Issue 14: names cannot escape --out, bad input is caught up front as one line, refused commands leave
nothing behind, resumes leave no staging folders and files follow the umask."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from helpers import assert_user_error, run_cli
from test_study import TINY, write_study
from transferlab import files, names, store
from transferlab.study import load_study, plan

FAST = ["--epochs", "1", "--batch-size", "64", "--no-progress", "--device", "cpu"]
PRETRAIN = ["pretrain", "--model", "mlp", "--dataset", "mnist-sample", "--n", "200", *FAST]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One finished MLP run (pretrained on 200 MNIST-sample images), shared by the tests below."""
    from transferlab.runs import PretrainRequest, RunOutput, pretrain
    from transferlab.training import TrainConfig

    runs = tmp_path_factory.mktemp("tiny-runs")
    return pretrain(PretrainRequest(model="mlp", dataset="mnist-sample", n=200),
                    config=TrainConfig(epochs=1, batch_size=64), device="cpu",
                    output=RunOutput(runs, progress=False)).run_dir


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ 1. names are names
@pytest.mark.parametrize("name", [".", "..", "../../x", "a/b", "/abs/path", "", "x" * 300, "sp ace", "a\\b"])
def test_check_name_refuses_anything_but_one_path_component(name):
    from transferlab.errors import UserError

    with pytest.raises(UserError):
        names.check_name(name)


@pytest.mark.parametrize("bad", [".", "..", "../../escaped", "/abs/elsewhere"])
def test_cli_name_cannot_reach_outside_out(tmp_path, capsys, bad):
    out = tmp_path / "out"
    (out / "keep").mkdir(parents=True)
    (out / "keep" / "user-file.txt").write_text("mine")
    (tmp_path / "escaped").mkdir()
    before_out, before_parent = _snapshot(out), sorted(p.name for p in tmp_path.iterdir())
    name = str(tmp_path / "escaped") if bad.startswith("/") else bad
    assert_user_error([*PRETRAIN, "--out", out, "--name", name], capsys, "--name")
    assert _snapshot(out) == before_out
    assert sorted(p.name for p in tmp_path.iterdir()) == before_parent
    assert not any((tmp_path / "escaped").iterdir())


def test_a_folder_that_is_not_the_same_run_is_never_replaced(tiny_run, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "mine").mkdir(parents=True)
    (out / "mine" / "thesis.tex").write_text("years of work")
    assert_user_error([*PRETRAIN, "--out", out, "--name", "mine"], capsys, "not a finished transferlab run")
    assert (out / "mine" / "thesis.tex").read_text() == "years of work"
    # Another finished run sitting under the name asked for is not replaced either.
    other = out / "other"
    store.save_run(other, store.load_run(tiny_run)[0], {**store.read_run_info(tiny_run), "name": "other"})
    (out / "renamed").mkdir()
    for f in other.iterdir():
        (out / "renamed" / f.name).write_bytes(f.read_bytes())
    assert_user_error([*PRETRAIN, "--out", out, "--name", "renamed"], capsys, "holds another run")
    # The same run, finished, is replaced (re-running a command is fine).
    code, _, err = run_cli([*PRETRAIN, "--out", out, "--name", "other"], capsys)
    assert code == 0, err


def test_study_names_and_npz_paths_stay_inside_out(tmp_path, capsys):
    bad = TINY.replace('name = "k"', 'name = "x/../../../../evil"')
    number = bad.splitlines().index('name = "x/../../../../evil"') + 1
    assert_user_error(["run", write_study(tmp_path, bad), "--out", tmp_path / "out"], capsys,
                      f"pretrain[0].name (line {number})")
    # An npz dataset given as a path becomes a slug in run names: every output lies under runs/.
    data = tmp_path / "d" / "my data"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        np.savez(data / f"{split}.npz", x=rng.integers(0, 255, (400, 28, 28), dtype=np.uint8),
                 y=np.arange(400) % 10)
    deep = f"npz:{data}/../../d/my data"
    study = load_study(write_study(tmp_path, TINY.replace('dataset = "mnist-sample"', f'dataset = "{deep}"')))
    out = tmp_path / "out"
    for step in plan(study, out):
        assert names.inside(step.output, out), step.output
    assert any(s.output.name.startswith("final_k_npz-my-data") for s in plan(study, out))


def test_run_json_name_is_checked_when_read_back(tiny_run, tmp_path, capsys):
    copy = tmp_path / "runs" / "copy"
    copy.mkdir(parents=True)
    for f in tiny_run.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    info = json.loads((copy / "run.json").read_text())
    (copy / "run.json").write_text(json.dumps({**info, "name": "../../../x"}))
    out = tmp_path / "m"
    assert_user_error(["attack-matrix", "--sources", copy, "--targets", tiny_run, "--dataset", "mnist-sample",
                       "--attack", "fgsm", "--eps", "0.1", "--samples", "50", "--device", "cpu", "--no-progress",
                       "--out", out], capsys, "run name")
    assert not out.exists() and not (tmp_path.parent / "x").exists()


# ------------------------------------------------------------------ 2. study values checked at load
def _replace(old: str, new: str) -> str:
    assert old in TINY, old
    return TINY.replace(old, new, 1)


ATTACK = '[[attack]]\nattack = "fgsm"\neps = [0.1, 0.2]'
LATE_VALUES = [
    ("eps-1.5", _replace(ATTACK, '[[attack]]\nattack = "fgsm"\neps = [0.1, 1.5]'), "attack[0].eps"),
    ("eps-nan", _replace(ATTACK, '[[attack]]\nattack = "fgsm"\neps = [nan]'), "attack[0].eps"),
    ("eps-negative", _replace(ATTACK, '[[attack]]\nattack = "fgsm"\neps = [-0.1]'), "attack[0].eps"),
    ("unknown-model", _replace('model = "mlp"', 'model = "resnett"'), "pretrain[0].model"),
    ("unknown-dataset", _replace('dataset = "mnist-sample"', 'dataset = "mnsit"'), "finetune[0].dataset"),
    ("unknown-attack", _replace('attack = "fgsm"', 'attack = "fgsmm"'), "attack[0].attack"),
    ("freeze-range", _replace("freeze = [2]", "freeze = [99]"), "finetune[0].freeze"),
    ("epochs-0", _replace("epochs = 2", "epochs = 0"), "finetune[0].epochs"),
    ("samples-0", _replace("samples = 100", "samples = 0"), "evaluation.samples"),
    ("steps-0", _replace(ATTACK, ATTACK + "\nsteps = 0"), "attack[0].steps"),
    ("labels", _replace("samples = 100", 'samples = 100\nlabels = "truth"'), "evaluation.labels"),
    ("device", _replace('device = "cpu"', 'device = "gpu"'), "study.device"),
    ("canvas", _replace("download = false", 'download = false\ncanvas = "rgb64"'), "data.canvas"),
    ("model-option", _replace('model = "mlp"', 'model = "mlp"\noptions = { depth = 3 }'), "pretrain[0].options"),
]


@pytest.mark.parametrize("text,fragment", [c[1:] for c in LATE_VALUES], ids=[c[0] for c in LATE_VALUES])
def test_values_a_step_would_reject_are_rejected_at_load_with_their_line(tmp_path, capsys, text, fragment):
    path = write_study(tmp_path, text)
    line = assert_user_error(["run", path, "--out", tmp_path / "out", "--dry-run"], capsys, fragment, "(line ")
    number = int(line.split("(line ")[1].split(")")[0])
    key = fragment.rsplit(".", 1)[1]
    assert text.splitlines()[number - 1].lstrip().startswith(key), (number, line)
    assert not (tmp_path / "out").exists()


def test_finetune_epochs_error_names_its_own_line_not_the_first_epochs(tmp_path, capsys):
    text = _replace("epochs = 2", "epochs = -1")  # [train] epochs = 1 comes first in the file
    number = text.splitlines().index("epochs = -1") + 1
    assert_user_error(["run", write_study(tmp_path, text), "--dry-run"], capsys, f"finetune[0].epochs (line {number})")
    # A value inherited from [train] is reported at [train]'s line.
    text = _replace("[train]\nepochs = 1", "[train]\nepochs = 1\nlabel_smoothing = 1.5")
    number = text.splitlines().index("label_smoothing = 1.5") + 1
    assert_user_error(["run", write_study(tmp_path, text), "--dry-run"], capsys, f"(line {number})")


@pytest.mark.slow  # over 0.7 s on 2 cores: the full suite (--all) runs it
def test_set_overrides_are_applied_and_validated_like_the_file(tmp_path, capsys):
    path = write_study(tmp_path)
    study = load_study(path, ["train.epochs=3", "study.seeds=[0, 1]", "finetune.n=[300]", "study.device=cpu"])
    assert study["train"]["epochs"] == 3 and study["study"]["seeds"] == [0, 1]
    assert study["finetune"][0]["n"] == [300] and study["finetune"][0]["epochs"] == 2  # its own value stays
    assert study["pretrain"][0]["epochs"] == 3  # inherited from [train]
    assert_user_error(["run", path, "--dry-run", "--set", "train.epochs=0"], capsys, "train.epochs (from --set)")
    assert_user_error(["run", path, "--dry-run", "--set", "attack[0].eps=[2]"], capsys, "attack[0].eps (from --set)")
    assert_user_error(["run", path, "--dry-run", "--set", "train.epoch=2"], capsys, "train.epoch")
    assert_user_error(["run", path, "--dry-run", "--set", "epochs"], capsys, "--set")
    code, out, _ = run_cli(["run", path, "--dry-run", "--set", "study.seeds=[0,1]", "--out", tmp_path / "o"], capsys)
    assert code == 0 and "s1" in out


# ------------------------------------------------------------------ 3. tracebacks become one line
def _npz_folder(root: Path, x_train, y_train) -> str:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    np.savez(root / "train.npz", x=x_train, y=y_train)
    np.savez(root / "test.npz", x=rng.integers(0, 255, (20, 28, 28), dtype=np.uint8), y=np.arange(20) % 10)
    return f"npz:{root}"


def _cli_cases(tmp_path: Path, run_dir: Path):
    """(id, argv, fragment) for each input that used to end in a traceback."""
    no_dataset = tmp_path / "no-dataset"
    no_name = tmp_path / "no-name"
    for folder, drop in ((no_dataset, "dataset"), (no_name, "name")):
        folder.mkdir()
        for f in run_dir.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        info = json.loads((folder / "run.json").read_text())
        info.pop(drop)
        (folder / "run.json").write_text(json.dumps(info))
    rng = np.random.default_rng(0)
    empty_images = _npz_folder(tmp_path / "zero", np.zeros((20, 0, 0), np.uint8), np.arange(20) % 10)
    huge_label = _npz_folder(tmp_path / "huge", rng.integers(0, 255, (20, 28, 28), dtype=np.uint8),
                             np.array([10**9] + [1] * 19))
    text_npz = tmp_path / "text"
    text_npz.mkdir()
    (text_npz / "train.npz").write_text("not numbers")
    (text_npz / "test.npz").write_text("not numbers")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(bytes(range(256)) * 4)
    results = tmp_path / "latin1"
    results.mkdir()
    (results / "runs.csv").write_bytes("name,kind\ncaf\xe9,pretrain\n".encode("latin-1") + b"\xff\xfe\n")
    matrix = ["attack-matrix", "--sources", run_dir, "--targets", run_dir, "--dataset", "mnist-sample",
              "--eps", "0.1", "--samples", "20", "--device", "cpu", "--no-progress", "--out", tmp_path / "m"]
    out = ["--out", tmp_path / "runs"]
    return [
        ("negative-weight-decay", [*PRETRAIN, *out, "--weight-decay", "-1"], "--weight-decay"),
        ("overflowing-seed", [*PRETRAIN, *out, "--seed", str(2**64)], "--seed"),
        ("val-fraction-leaves-nothing", [*PRETRAIN, *out, "--val-fraction", "0.999"], "--val-fraction"),
        ("matrix-batch-size-0", [*matrix, "--batch-size", "0"], "batch"),
        ("run-json-without-dataset", [*matrix[:2], no_dataset, *matrix[3:]], "dataset"),
        ("run-json-without-name", [*matrix[:2], no_name, *matrix[3:]], "name"),
        ("npz-0x0-images", ["pretrain", "--model", "mlp", "--dataset", empty_images, *FAST, *out], "0x0"),
        ("npz-label-1e9", ["pretrain", "--model", "mlp", "--dataset", huge_label, *FAST, *out], "label"),
        ("npz-text-file", ["pretrain", "--model", "mlp", "--dataset", f"npz:{text_npz}", *FAST, *out],
         "not an .npz archive"),
        ("inspect-huge-num-classes", ["inspect", "mlp", "--num-classes", "99999999999"], "num_classes"),
        ("inspect-missing-dir", ["inspect", "/nonexistent/run"], "run directory not found"),
        ("binary-study", ["run", binary, "--dry-run"], "UTF-8"),
        ("non-utf8-csv", ["report", results], "runs.csv"),
    ]


CLI_CASE_IDS = ["negative-weight-decay", "overflowing-seed", "val-fraction-leaves-nothing", "matrix-batch-size-0",
                "run-json-without-dataset", "run-json-without-name", "npz-0x0-images", "npz-label-1e9",
                "npz-text-file", "inspect-huge-num-classes", "inspect-missing-dir", "binary-study", "non-utf8-csv"]


@pytest.mark.parametrize("case", CLI_CASE_IDS)
def test_bad_input_that_used_to_give_a_traceback_is_one_line(tiny_run, tmp_path, capsys, case):
    cases = {c[0]: c[1:] for c in _cli_cases(tmp_path, tiny_run)}
    argv, fragment = cases[case]
    assert_user_error(argv, capsys, fragment)
    # Refused: nothing left behind.
    assert not (tmp_path / "runs").exists() and not (tmp_path / "m").exists()


def test_full_disk_is_one_line_and_a_full_cache_only_warns(tmp_path, capsys, monkeypatch):
    import safetensors

    from transferlab import data

    def disk_full(tensors, filename, metadata=None):
        raise safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                          "message: \"No space left on device\" })")

    monkeypatch.setattr(store, "save_file", disk_full)
    assert_user_error([*PRETRAIN, "--out", tmp_path / "runs"], capsys, "No space left on device")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    # A cache directory that is full only costs the cache: the npz folder still loads, with a warning.
    folder = _npz_folder(tmp_path / "npz", np.random.default_rng(0).integers(0, 255, (30, 28, 28), dtype=np.uint8),
                         np.arange(30) % 10)
    with pytest.warns(UserWarning, match="could not cache"):
        dataset = data.load(folder, cache_dir=tmp_path / "cache")
    assert len(dataset.train) == 30


# ------------------------------------------------------------------ refused commands leave nothing behind
def test_refused_commands_leave_no_out_no_sample_set_no_lock(tiny_run, tmp_path, capsys):
    assert_user_error([*PRETRAIN, "--out", tmp_path / "a" / "b", "--optimizer", "adamm"], capsys, "optimizer")
    assert not (tmp_path / "a").exists()
    matrix = tmp_path / "m"
    assert_user_error(["attack-matrix", "--sources", tiny_run, "--targets", tiny_run, "--dataset", "mnist-sample",
                       "--eps", "0.1", "--samples", "999999", "--device", "cpu", "--no-progress", "--out", matrix],
                      capsys, "--samples")
    assert not matrix.exists()
    study_out = tmp_path / "s"
    text = _replace("freeze = [2]", 'freeze = [2]\nfreeze_to = ["x"]')
    assert_user_error(["run", write_study(tmp_path, text), "--out", study_out], capsys, "freeze")
    assert not study_out.exists()


# ------------------------------------------------------------------ 4. staging folders and file modes
@pytest.mark.slow  # over 0.7 s on 2 cores: the full suite (--all) runs it
def test_resume_removes_staging_folders_left_by_a_kill(tmp_path):
    from transferlab.study import StudyRunOptions, run_study

    text = _replace(ATTACK + "\n", "").replace("[evaluation]\nsamples = 100\nwhite_box = false\n", "")
    text = text.replace('from = ["k", "f"]', 'from = ["k"]').replace("n = [200, 400]", "n = [200]")
    study, out = write_study(tmp_path, text), tmp_path / "out"
    run_study(study, out, StudyRunOptions(progress=False))
    runs = out / "runs"
    finished = sorted(p.name for p in runs.iterdir())
    # What a kill between the renames of store.staging_dir leaves: a half-built .tmp and a replaced .old.
    (runs / ".pre_k_s0.0123abcd.tmp").mkdir()
    (runs / ".pre_k_s0.0123abcd.tmp" / "model.safetensors").write_bytes(b"half")
    (runs / ".final_k_mnist-sample200_f2_s0.89abcdef.old").mkdir()
    (runs / ".users-own.folder").mkdir()  # not ours: kept
    (out / ".study.json.ab_12xyz.tmp").write_text("{")  # a file write killed before its rename
    outcome = run_study(study, out, StudyRunOptions(progress=False))
    assert outcome.executed == []
    assert sorted(p.name for p in runs.iterdir()) == sorted(finished + [".users-own.folder"])
    assert not (out / ".lock").exists() and not (out / ".study.json.ab_12xyz.tmp").exists()


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_write_that_fails_half_way_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch, failure):
    import torch

    target = tmp_path / "out.json"
    store.atomic_write_json(target, {"version": 1})

    def half_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise failure

    monkeypatch.setattr(store, "save_file", half_then_fail)
    with pytest.raises(type(failure)):
        store.atomic_save_tensors(target, {"x": torch.zeros(3)})
    with pytest.raises(type(failure)):
        with store.atomic_file(target) as tmp:
            tmp.write_text('{"version": ')
            raise failure
    with pytest.raises(TypeError):
        store.atomic_write_bytes(target, "text, not bytes")  # fails after the temporary file is opened
    assert json.loads(target.read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_an_interrupted_replacement_keeps_the_previous_run(tiny_run, tmp_path, monkeypatch):
    """Interrupted between the two renames of store.staging_dir: the finished run is put back, no .tmp/.old left."""
    run = tmp_path / "run"
    model, info = store.load_run(tiny_run)
    store.save_run(run, model, {**info, "name": "run"})
    before = _snapshot(run)
    real_replace, calls = os.replace, []

    def interrupted(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the old run is moved aside; the new one is not in place yet
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(store.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.save_run(run, model, {**info, "name": "run", "seed": 99})
    monkeypatch.undo()
    assert _snapshot(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_every_file_written_follows_the_umask(tmp_path, capsys):
    old = os.umask(0o027)
    try:
        import importlib

        importlib.reload(files)  # the umask is read once at import, as a running process would
        importlib.reload(store)
        code, _, err = run_cli([*PRETRAIN, "--out", tmp_path], capsys)
        assert code == 0, err
        written = [p for p in tmp_path.rglob("*") if p.is_file()]
        assert any(p.suffix == ".safetensors" for p in written)
        for path in written:
            assert stat.S_IMODE(path.stat().st_mode) == 0o640, (path, oct(path.stat().st_mode))
    finally:
        os.umask(old)
        import importlib

        importlib.reload(files)
        importlib.reload(store)


@pytest.mark.slow  # over 0.7 s on 2 cores: the full suite (--all) runs it
def test_more_late_study_values_are_caught_at_load(tmp_path, capsys):
    cases = [
        (_replace("n = 400", "n = 5"), "pretrain[0].n"),  # fewer images than classes
        (_replace("n = [200, 400]", "n = [200, 99999]"), "finetune[0].n"),
        (_replace("samples = 100", "samples = 5000"), "evaluation.samples"),
        (_replace(ATTACK, ATTACK + "\nsteps = 2\noptions = { steps = 3 }"), "attack[0].options"),
        (_replace(ATTACK, ATTACK + "\noptions = { colour = 3 }"), "attack[0].options"),
        (_replace("freeze = [2]", 'freeze_to = ["nope"]'), "finetune[0].freeze_to"),
        (_replace("batch_size = 64", "batch_size = 0"), "train.batch_size"),
        (_replace("seeds = [0]", "seeds = [-1]"), "study.seeds"),
    ]
    for text, fragment in cases:
        assert_user_error(["run", write_study(tmp_path, text), "--dry-run", "--out", tmp_path / "o"], capsys,
                          fragment, "(line ")


def test_nan_weights_are_refused(tiny_run, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_run.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    state = load_file(str(broken / "model.safetensors"))
    first = next(k for k, t in state.items() if t.is_floating_point())
    state[first] = torch.full_like(state[first], float("nan"))
    save_file(state, str(broken / "model.safetensors"))
    # Recorded as its checksum too (a run saved with NaN weights): else the checksum is what refuses it.
    info = json.loads((broken / "run.json").read_text())
    info[store.FILES_SHA256][store.WEIGHTS_FILE] = store.file_sha256(broken / "model.safetensors")
    (broken / "run.json").write_text(json.dumps(info))
    assert_user_error(["finetune", "--from", broken, "--dataset", "mnist-sample", "--n", "100", *FAST,
                       "--out", tmp_path / "o"], capsys, "NaN")


def test_seed_and_attack_options_of_the_matrix_are_checked(tiny_run, tmp_path, capsys):
    base = ["attack-matrix", "--sources", tiny_run, "--targets", tiny_run, "--dataset", "mnist-sample", "--eps", "0.1",
            "--samples", "20", "--device", "cpu", "--no-progress", "--out", tmp_path / "m"]
    assert_user_error([*base, "--seed", str(2**64)], capsys, "--seed")
    assert_user_error([*base, "--attack", "pgd", "--steps", "2", "--attack-opt", "steps=3"], capsys, "given twice")
    assert not (tmp_path / "m").exists()
