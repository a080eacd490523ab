"""Issue 14: a cache that still opens is not trusted blindly. Each corruption the audit tried (and a few
more) is applied by one fixture; every cache reader must warn and rebuild, never use it and never crash."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from transferlab import data, store
from transferlab.matrix import run_matrix


def _read(path: Path):
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})


def _rewrite(path: Path, change, recompute_checksum: bool = False) -> None:
    tensors, metadata = _read(path)
    tensors = change(dict(tensors))
    if recompute_checksum:  # a file that passes its checksum but is wrong in content
        metadata["checksum"] = store.tensor_checksum(tensors)
    save_file(tensors, str(path), metadata=metadata)


def _flip_bytes(path: Path, _other: Path) -> None:
    raw = bytearray(path.read_bytes())
    for i in range(len(raw) - 64, len(raw), 7):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def _invert(path: Path, _other: Path) -> None:
    def change(t):
        key = next(k for k in t if t[k].is_floating_point() or t[k].dtype == torch.uint8)
        t[key] = (1 - t[key]) if t[key].is_floating_point() else (255 - t[key])
        return t
    _rewrite(path, change)


def _shift_labels(path: Path, _other: Path) -> None:
    def change(t):
        key = next((k for k in t if t[k].dtype == torch.int64), next(iter(t)))
        t[key] = (t[key] + 1) % 10 if t[key].dtype == torch.int64 else 1 - t[key]
        return t
    _rewrite(path, change)


def _drop_key(path: Path, _other: Path) -> None:
    _rewrite(path, lambda t: dict(list(t.items())[1:]) if len(t) > 1 else {"other": next(iter(t.values()))})


def _truncate(path: Path, _other: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _copy_other(path: Path, other: Path) -> None:
    shutil.copyfile(other, path)


def _plain_safetensors(path: Path, _other: Path) -> None:
    """The same tensors written by another tool: no checksum, so nothing vouches for them."""
    tensors, _ = _read(path)
    save_file(tensors, str(path))


CORRUPTIONS = {"flip-bytes": _flip_bytes, "invert-pixels": _invert, "shift-labels": _shift_labels,
               "drop-key": _drop_key, "truncate": _truncate, "copy-of-another": _copy_other,
               "no-checksum": _plain_safetensors}


@pytest.fixture(params=sorted(CORRUPTIONS))
def corrupt(request):
    """corrupt(path, other): damage the cache file at ``path`` one way (``other``: a valid file of another entry)."""
    return CORRUPTIONS[request.param]


# ------------------------------------------------------------------ canvas cache
def _npz(root: Path, seed: int) -> str:
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        np.savez(root / f"{split}.npz", x=rng.integers(0, 255, (40, 28, 28), dtype=np.uint8),
                 y=rng.permutation(np.arange(40) % 10))
    return f"npz:{root}"


def test_a_damaged_or_foreign_canvas_cache_is_rebuilt_with_a_warning(tmp_path, corrupt):
    cache = tmp_path / "cache"
    mine, other = _npz(tmp_path / "mine", 0), _npz(tmp_path / "other", 1)
    fresh = data.load(mine, cache_dir=cache)
    data.load(other, cache_dir=cache)
    files = {p.name.split("-gray28")[0]: p for p in cache.glob("*.safetensors")}
    corrupt(files["npz-mine"], files["npz-other"])
    with pytest.warns(UserWarning, match="canvas cache file"):
        again = data.load(mine, cache_dir=cache)
    assert again.fingerprint("train") == fresh.fingerprint("train")
    assert again.fingerprint("test") == fresh.fingerprint("test")
    with warnings.catch_warnings():  # rebuilt: the next load trusts it again, silently
        warnings.simplefilter("error")
        assert data.load(mine, cache_dir=cache).fingerprint("train") == fresh.fingerprint("train")


# ------------------------------------------------------------------ matrix caches
@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from transferlab.runs import FinetuneRequest, PretrainRequest, RunOutput, finetune, pretrain
    from transferlab.training import TrainConfig

    runs = tmp_path_factory.mktemp("cache-runs")
    common = dict(config=TrainConfig(epochs=1, batch_size=64), device="cpu", output=RunOutput(runs, progress=False))
    source = pretrain(PretrainRequest(model="mlp", dataset="mnist-sample", n=200), **common).run_dir
    target = finetune(FinetuneRequest(dataset="mnist-sample", source=source, n=200, freeze_n=2), **common).run_dir
    return source, target


def _matrix(pair, out: Path):
    return run_matrix(sources=[pair[0]], targets=[pair[1]], dataset="mnist-sample", attack_names=["fgsm"],
                      eps_values=[0.1, 0.2], samples=100, device="cpu", out_dir=out, progress=False,
                      white_box=False)


@pytest.mark.parametrize("which", ["adversarial", "correct"])
def test_a_damaged_matrix_cache_is_recrafted_with_a_warning(pair, tmp_path, corrupt, which):
    out = tmp_path / "m"
    expected = _matrix(pair, out).cells
    files = sorted((out / which).rglob("*.safetensors"))
    assert len(files) == (2 if which == "adversarial" else 2 * 2)  # 2 sets; results: per set and evaluated model
    corrupt(files[0], files[1])
    if which == "adversarial":
        shutil.rmtree(out / "correct")  # make the matrix read the set back
    with pytest.warns(UserWarning, match="adversarial set|matrix cache file"):
        again = _matrix(pair, out).cells
    pd.testing.assert_frame_equal(again, expected)


@pytest.mark.parametrize("damage", ["wrong-shape", "outside-eps-ball", "clean-images"])
def test_an_adversarial_set_with_a_valid_checksum_but_wrong_content_is_recrafted(pair, tmp_path, damage):
    out = tmp_path / "m"
    expected = _matrix(pair, out).cells
    path = sorted((out / "adversarial").glob("*.safetensors"))[0]

    def change(t):
        adv = t["adversarial"]
        if damage == "wrong-shape":
            t["adversarial"] = adv[:10]
        elif damage == "outside-eps-ball":
            t["adversarial"] = (adv + 0.5).clamp(0, 1)
        else:  # within the ball, so only the checksum written with the set could tell
            t["adversarial"] = adv * 0 + adv.mean()
        return t

    _rewrite(path, change, recompute_checksum=(damage != "clean-images"))
    shutil.rmtree(out / "correct")
    with pytest.warns(UserWarning, match="adversarial set"):
        again = _matrix(pair, out).cells
    pd.testing.assert_frame_equal(again, expected)


def test_correct_cache_with_wrong_shape_is_evaluated_again(pair, tmp_path):
    out = tmp_path / "m"
    expected = _matrix(pair, out).cells
    path = sorted((out / "correct").rglob("*.safetensors"))[0]
    _rewrite(path, lambda t: {k: v[:5] for k, v in t.items()}, recompute_checksum=True)
    with pytest.warns(UserWarning, match="wrong shape"):
        pd.testing.assert_frame_equal(_matrix(pair, out).cells, expected)


# ------------------------------------------------------------------ study step keys see npz contents
def test_changed_npz_data_reruns_its_steps(tmp_path):
    from transferlab.study import load_study, plan

    folder = _npz(tmp_path / "d", 0)
    text = f"""
[study]
name = "npz"
device = "cpu"
[train]
epochs = 1
[[pretrain]]
name = "p"
model = "mlp"
dataset = "{folder}"
"""
    path = tmp_path / "s.toml"
    path.write_text(text)
    before = plan(load_study(path), tmp_path / "out")[0].key
    rng = np.random.default_rng(5)
    np.savez(tmp_path / "d" / "train.npz", x=rng.integers(0, 255, (40, 28, 28), dtype=np.uint8),
             y=np.arange(40) % 10)
    assert plan(load_study(path), tmp_path / "out")[0].key != before
    assert json.dumps(plan(load_study(path), tmp_path / "out")[0].config["data"]).count("files_sha256") == 1


# ------------------------------------------------------------------ provenance
@pytest.mark.slow  # two matrices with their figures
def test_matrix_json_and_summary_say_how_cells_were_computed(pair, tmp_path):
    from transferlab.report import write_matrix_outputs

    out = tmp_path / "m"
    result = _matrix(pair, out)
    record = json.loads((out / "matrix.json").read_text())
    source, target = (store.read_run_info(p)["name"] for p in pair)
    crafting, evaluation = record["numerics"]["crafting"], record["numerics"]["evaluation"]
    assert crafting[source] == evaluation[source]  # one decision per model for crafting and scoring
    assert evaluation[target]["precision"] in ("fp32", "bf16") and evaluation[target]["decided_by"] == "measured"
    used = f"{evaluation[target]['precision']}+{evaluation[target]['memory_format']}"
    assert set(result.cells.loc[result.cells["evaluated"] == target, "eval_numerics"]) == {used}
    assert record["label_policy_applied"] == {source: "true"}
    assert record["reference_labels"] == {target: "true labels", source: "true labels"}
    write_matrix_outputs(out, result.cells, result.lineage, result.examples_file)
    summary = (out / "summary.md").read_text()
    assert "How the cells were computed" in summary and evaluation[target]["precision"] in summary


def test_counts_stay_integers_and_accuracies_exact():
    from transferlab.tables import integer_columns

    cells = pd.DataFrame({"steps": [5.0, None], "samples": [2000.0, 2000.0], "eps": [0.1, 0.2]})
    written = integer_columns(cells).to_csv(index=False)
    assert written.splitlines()[1:] == ["5,2000,0.1", ",2000,0.2"]

    # Lineage accuracies come from counts: 201 of 2000 is 0.1005 exactly as float64 (float32 gave 0.10049999).
    from types import SimpleNamespace

    from transferlab.matrix import AttackSetting
    from transferlab.matrix.merge import _lineage_tests

    own_ok = torch.zeros(2000, dtype=torch.bool)
    own_ok[:201] = True
    other_ok = torch.ones(2000, dtype=torch.bool)
    own = SimpleNamespace(name="own", family="mlp", weights_sha256="a")
    other = SimpleNamespace(name="other", family="mlp", weights_sha256="b")
    target = SimpleNamespace(name="t", family="mlp", source_sha256="a")
    setting = AttackSetting("fgsm", 0.1, {})
    lineage = _lineage_tests([own, other], [target], [setting],
                             {("own", "t", "fgsm", 0.1): own_ok, ("other", "t", "fgsm", 0.1): other_ok}, 0, 2000)
    assert lineage["acc_own"].iloc[0] == 0.1005 and f"{100 * lineage['acc_own'].iloc[0]:.1f}" == "10.1"
    assert lineage.to_csv(index=False).splitlines()[1].split(",")[7] == "2000"


def test_columns_scored_against_own_predictions_are_explained_under_the_table():
    from transferlab.report.matrices import matrix_table

    rows = []
    for target, role, reference in (("t", "finetuned", "true labels"), ("k", "pretrained", "own clean predictions")):
        rows.append({"crafted_on": "k", "evaluated": target, "crafted_on_role": "pretrained", "evaluated_role": role,
                     "crafted_on_model": "mlp", "evaluated_model": "mlp", "crafted_on_dataset": "kmnist",
                     "evaluated_dataset": "mnist" if role == "finetuned" else "kmnist",
                     "crafted_on_pretrain_dataset": "kmnist", "evaluated_pretrain_dataset": "kmnist",
                     "attack": "fgsm",
                     "eps": 0.1, "seed": 0, "samples": 10, "clean_accuracy": 1.0, "adversarial_accuracy": 0.5,
                     "white_box": target == "k", "same_pretraining": True, "reference_labels": reference,
                     "attack_success_rate": 0.5, "clean_correct": 10, "adversarial_correct": 5})
    from transferlab.report.matrices import display_labels, prepare_cells

    cells = pd.DataFrame(rows)
    labels = display_labels(prepare_cells(cells))
    caption = matrix_table(cells, "fgsm", 0.1).caption
    note = caption.split("Columns ", 1)[1]
    assert note.startswith(f"{labels['k']}:") and "own clean predictions" in note
    assert labels["t"] not in note.split(":")[0]


def test_a_failed_attack_matrix_leaves_no_sample_set(pair, tmp_path):
    from transferlab.errors import UserError

    def refuse(*args, **kwargs):
        raise UserError("this attack cannot run on this model")

    out = tmp_path / "m"
    with pytest.raises(UserError):
        run_matrix(sources=[pair[0]], targets=[pair[1]], dataset="mnist-sample", attack_names=["fgsm"],
                   eps_values=[0.1], samples=50, device="cpu", out_dir=out, progress=False, craft_fn=refuse)
    assert not out.exists() or not any(out.rglob("*.json"))


def test_an_adversarial_set_forged_from_the_clean_images_is_recrafted(pair, tmp_path):
    # The clean images themselves, with a checksum recomputed to match: they pass the checksum and the eps ball,
    # but no attack at eps > 0 leaves every image untouched.
    import json

    import torch

    from transferlab import data as data_mod
    from transferlab.device import to_float

    out = tmp_path / "m"
    expected = _matrix(pair, out).cells
    indices = json.loads((out / "sample_set.json").read_text())["indices"]
    clean = to_float(data_mod.load("mnist-sample", download=False).test.images[torch.tensor(indices)])
    path = sorted((out / "adversarial").glob("*.safetensors"))[0]
    _rewrite(path, lambda t: {**t, "adversarial": clean.clone()}, recompute_checksum=True)
    shutil.rmtree(out / "correct")
    with pytest.warns(UserWarning, match="clean images themselves"):
        again = _matrix(pair, out).cells
    pd.testing.assert_frame_equal(again, expected)
