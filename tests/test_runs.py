"""pretrain -> finetune through the CLI, as a user runs it, on the shipped sample data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import assert_user_error, run_cli
from transferlab import store
from transferlab.models import parameter_table

FAST = ["--epochs", "1", "--batch-size", "64", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A small ResNet pretrained on 300 KMNIST-sample images (shared by several tests)."""
    from transferlab.runs import PretrainRequest, RunOutput, pretrain
    from transferlab.training import TrainConfig

    runs = tmp_path_factory.mktemp("runs")
    outcome = pretrain(PretrainRequest(model="resnet", dataset="kmnist-sample", n=300),
                       config=TrainConfig(epochs=1, batch_size=64), device="cpu",
                       output=RunOutput(runs, progress=False))
    return outcome.run_dir


def test_pretrain_writes_a_complete_run(tmp_path, capsys):
    code, out, _ = run_cli(["pretrain", "--model", "mlp", "--dataset", "fmnist-sample", "--n", "500",
                            "--out", tmp_path, *FAST], capsys)
    assert code == 0
    run_dir = tmp_path / "pre_mlp_fmnist-sample500_s0"
    assert "pretrained pre_mlp_fmnist-sample500_s0" in out and "test" in out
    assert sorted(p.name for p in run_dir.iterdir()) == ["model.safetensors", "run.json", "subset_indices.json"]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["kind"] == "pretrain" and info["model"]["family"] == "mlp"
    assert info["dataset"]["name"] == "fmnist-sample" and info["dataset"]["canvas"] == "gray28"
    assert 0.0 <= info["metrics"]["test_accuracy"] <= 1.0 and 0.0 <= info["metrics"]["train_accuracy"] <= 1.0
    assert info["metrics"]["test_accuracy"] > 0.3  # far above chance after one epoch
    assert {"torch", "torchvision", "transferlab"} <= set(info["versions"])
    assert info["hyperparameters"]["epochs"] == 1 and info["seed"] == 0
    assert len(info["history"]) == 1 and info["duration_s"] > 0
    assert info["dataset"]["provenance"]
    indices = json.loads((run_dir / "subset_indices.json").read_text())
    assert len(indices) == 500 and indices == sorted(indices)
    # No temporary directories are left beside the finished run.
    assert [p.name for p in tmp_path.iterdir()] == [run_dir.name]


def test_finetune_freezes_tensors_and_batchnorm_statistics(pretrained, tmp_path, capsys):
    code, out, _ = run_cli(["finetune", "--from", pretrained, "--dataset", "mnist-sample", "--n", "200",
                            "--freeze", "23", "--out", tmp_path, *FAST], capsys)
    assert code == 0, out
    run_dir = tmp_path / "final_resnet_kmnist-sample300_mnist-sample200_f23_s0"
    info = json.loads((run_dir / "run.json").read_text())
    assert info["kind"] == "finetune" and info["freeze"]["n"] == 23 and not info["freeze"]["head_replaced"]
    assert info["source"]["name"] == pretrained.name and info["lineage"]["pretrain_dataset"] == "kmnist-sample"
    assert info["source"]["weights_sha256"] == store.file_sha256(pretrained / "model.safetensors")

    before, after = load_file(str(pretrained / "model.safetensors")), load_file(str(run_dir / "model.safetensors"))
    names = [row["name"] for row in parameter_table(store.load_run(run_dir)[0])]
    for name in names[:23]:
        assert torch.equal(before[name], after[name]), f"frozen tensor {name} changed"
    assert any(not torch.equal(before[name], after[name]) for name in names[23:])
    # BatchNorm layers whose parameters are all frozen keep their running statistics...
    for bn in ("stem.bn", "block1.bn1", "block2.bn2", "block3.bn1"):
        assert torch.equal(before[f"{bn}.running_mean"], after[f"{bn}.running_mean"]), bn
    # ...while block3's second BN (trainable) keeps learning them.
    assert not torch.equal(before["block3.bn2.running_mean"], after["block3.bn2.running_mean"])


def test_bn_stats_update_reproduces_the_original_behaviour(pretrained, tmp_path, capsys):
    code, _, _ = run_cli(["finetune", "--from", pretrained, "--dataset", "mnist-sample", "--n", "200",
                          "--freeze", "20", "--bn-stats", "update", "--out", tmp_path, *FAST], capsys)
    assert code == 0
    after = load_file(str(tmp_path / "final_resnet_kmnist-sample300_mnist-sample200_f20_s0" / "model.safetensors"))
    before = load_file(str(pretrained / "model.safetensors"))
    assert torch.equal(before["stem.conv.weight"], after["stem.conv.weight"])
    assert not torch.equal(before["stem.bn.running_mean"], after["stem.bn.running_mean"])


def test_freeze_to_names_a_block(pretrained, tmp_path, capsys):
    code, _, _ = run_cli(["finetune", "--from", pretrained, "--dataset", "mnist-sample", "--n", "100",
                          "--freeze-to", "block2", "--name", "ft", "--out", tmp_path, *FAST], capsys)
    assert code == 0
    assert json.loads((tmp_path / "ft" / "run.json").read_text())["freeze"]["n"] == 20


def test_from_scratch_baseline_uses_the_same_subset(tmp_path, capsys):
    args = ["--dataset", "mnist-sample", "--n", "300", "--out", tmp_path, *FAST]
    assert run_cli(["finetune", "--model", "mlp", *args], capsys)[0] == 0
    run_dir = tmp_path / "scratch_mlp_mnist-sample300_s0"
    info = json.loads((run_dir / "run.json").read_text())
    assert info["kind"] == "scratch" and info["source"] is None
    from transferlab.data import load, stratified_subset

    expected = stratified_subset(load("mnist-sample").train.labels, 300, 0).tolist()
    assert json.loads((run_dir / "subset_indices.json").read_text()) == expected


def test_head_is_replaced_when_class_counts_differ(tmp_path, capsys):
    rng = np.random.default_rng(0)
    folder = tmp_path / "four"
    folder.mkdir()
    for split, n in (("train", 120), ("test", 40)):
        np.savez(folder / f"{split}.npz", x=rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), y=np.arange(n) % 4)
    runs = tmp_path / "runs"
    assert run_cli(["pretrain", "--model", "mlp", "--dataset", f"npz:{folder}", "--name", "src",
                    "--out", runs, *FAST], capsys)[0] == 0
    # Freezing every tensor would leave nothing to learn, but the new 10-class head must train.
    code, out, err = run_cli(["finetune", "--from", runs / "src", "--dataset", "mnist-sample", "--n", "100",
                              "--freeze", "6", "--name", "ft", "--out", runs, *FAST], capsys)
    assert code == 0, err
    info = json.loads((runs / "ft" / "run.json").read_text())
    assert info["freeze"]["head_replaced"] and info["freeze"]["head_replaced_from"] == 4
    assert info["model"]["config"]["num_classes"] == 10
    model, _ = store.load_run(runs / "ft")
    assert model.get_classifier().out_features == 10


def test_same_seed_same_numbers_and_weights(tmp_path):
    from transferlab.runs import PretrainRequest, RunOutput, pretrain
    from transferlab.training import TrainConfig

    def once(seed, name):
        return pretrain(PretrainRequest(model="cnn", dataset="mnist-sample", n=200), seed=seed, device="cpu",
                        config=TrainConfig(epochs=1, batch_size=32, augment_shift=2),
                        output=RunOutput(tmp_path, name=name, progress=False))

    a, b, c = once(0, "a"), once(0, "b"), once(1, "c")
    assert a.info["metrics"] == b.info["metrics"] and a.info["history"][0]["loss"] == b.info["history"][0]["loss"]
    wa, wb, wc = (load_file(str(o.run_dir / "model.safetensors")) for o in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


def test_checkpoint_round_trip_gives_identical_predictions(pretrained):
    from transferlab.data import load
    from transferlab.training import predict

    model, info = store.load_run(pretrained)
    again, _ = store.load_run(pretrained)
    images = load("kmnist-sample").test.images[:200]
    assert torch.equal(predict(model, images, torch.device("cpu")), predict(again, images, torch.device("cpu")))
    assert info["model"]["config"]["family"] == "resnet"


def test_inspect_prints_the_reference_table(capsys):
    code, out, _ = run_cli(["inspect", "resnet", "--freeze", "23"], capsys)
    assert code == 0
    assert "32 parameter tensors" in out and "23 frozen, 9 trainable" in out
    assert "block3.conv1.weight" in out and "[64, 32, 3, 3]" in out
    code, out, _ = run_cli(["inspect", "alexnet", "--freeze-to", "conv4", "--num-classes", "47"], capsys)
    assert code == 0 and "8 frozen, 8 trainable" in out and "[47, 512]" in out


def test_models_lists_every_family(capsys):
    code, out, _ = run_cli(["models"], capsys)
    assert code == 0
    for family in ("alexnet", "resnet", "mixer", "mlp", "cnn", "vgg", "vit", "lstm"):
        assert family in out


# ------------------------------------------------------------------ bad input
def test_unknown_dataset_and_model_suggest_names(tmp_path, capsys):
    assert_user_error(["pretrain", "--model", "resnet", "--dataset", "kmnst", "--out", tmp_path, *FAST], capsys,
                      "kmnst", "kmnist")
    assert_user_error(["pretrain", "--model", "resnt", "--dataset", "kmnist-sample", "--out", tmp_path, *FAST],
                      capsys, "resnt", "resnet")
    assert not any(tmp_path.iterdir())


def test_freeze_out_of_range(pretrained, tmp_path, capsys):
    assert_user_error(["finetune", "--from", pretrained, "--dataset", "mnist-sample", "--freeze", "40",
                       "--out", tmp_path, *FAST], capsys, "--freeze 40", "32")
    assert_user_error(["finetune", "--from", pretrained, "--dataset", "mnist-sample", "--freeze", "-1",
                       "--out", tmp_path, *FAST], capsys, "--freeze -1")
    assert not any(tmp_path.iterdir())


def test_subset_size_out_of_range(tmp_path, capsys):
    assert_user_error(["pretrain", "--model", "mlp", "--dataset", "mnist-sample", "--n", "100000",
                       "--out", tmp_path, *FAST], capsys, "100000")
    assert_user_error(["pretrain", "--model", "mlp", "--dataset", "mnist-sample", "--n", "5",
                       "--out", tmp_path, *FAST], capsys, "5")
    assert not any(tmp_path.iterdir())


def test_missing_and_corrupt_checkpoints(pretrained, tmp_path, capsys):
    assert_user_error(["finetune", "--from", tmp_path / "nope", "--dataset", "mnist-sample", "--out", tmp_path,
                       *FAST], capsys, "nope")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "run.json").write_text((pretrained / "run.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\x00garbage, not a safetensors file")
    assert_user_error(["finetune", "--from", broken, "--dataset", "mnist-sample", "--out", tmp_path / "o", *FAST],
                      capsys, "corrupt")
    (broken / "run.json").write_text("{not json")
    assert_user_error(["finetune", "--from", broken, "--dataset", "mnist-sample", "--out", tmp_path / "o", *FAST],
                      capsys, "corrupt")
    # Weights of another architecture under a resnet run.json.
    mismatched = tmp_path / "mismatched"
    mismatched.mkdir()
    (mismatched / "run.json").write_text((pretrained / "run.json").read_text())
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, str(mismatched / "model.safetensors"))
    assert_user_error(["finetune", "--from", mismatched, "--dataset", "mnist-sample", "--out", tmp_path / "o",
                       *FAST], capsys, "does not match")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_canvas_mismatch_is_refused(pretrained, tmp_path, capsys):
    assert_user_error(["finetune", "--from", pretrained, "--dataset", "mnist-sample", "--canvas", "rgb32",
                       "--out", tmp_path, *FAST], capsys, "canvas")


def test_output_directory_that_cannot_be_created(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should go")
    assert_user_error(["pretrain", "--model", "mlp", "--dataset", "mnist-sample", "--out", blocker / "runs",
                       *FAST], capsys, "cannot write")


def test_run_json_records_epochs_asked_and_used(tmp_path, capsys):
    code, _, _ = run_cli(["pretrain", "--model", "mlp", "--dataset", "fmnist-sample", "--n", "128",
                          "--min-steps", "6", "--out", tmp_path, *FAST], capsys)
    assert code == 0
    info = json.loads((tmp_path / "pre_mlp_fmnist-sample128_s0" / "run.json").read_text())
    # 128 images at batch 64 are 2 steps an epoch: 6 steps need 3 epochs where 1 was asked
    assert info["epochs"] == {"asked": 1, "used": 3, "min_steps": 6, "steps": 6}
    assert info["hyperparameters"]["min_steps"] == 6 and len(info["history"]) == 3
