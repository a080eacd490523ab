"""Issue 12, verified: the API takes every CLI option with the CLI's defaults, and attack_matrix takes
in-memory models (a dict of nn.Modules with their label spaces)."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import transferlab
from transferlab import api, cli

ROOT = Path(__file__).resolve().parents[1]

# CLI parameter -> API parameter, where the names differ; None: not an API argument (and why).
RENAMED = {
    "pretrain": {"option": "options", "no_download": "download"},
    "finetune": {"option": "options", "no_download": "download"},
    "attack-matrix": {"attack_opt": "attack_options", "ensemble": "ensembles", "no_download": "download"},
    "run": {"study": "path", "set_": "overrides", "no_download": "download"},
}
# Defaults that differ on purpose: the API shows no progress bars; download=True is --no-download off;
# attack_matrix's attack/eps/select spell the CLI's defaults out; run_study's download None means "the study's".
SAME_MEANING = {("pretrain", "progress"), ("finetune", "progress"), ("attack-matrix", "progress"),
                ("run", "progress"), ("pretrain", "no_download"), ("finetune", "no_download"),
                ("attack-matrix", "no_download"), ("run", "no_download"), ("attack-matrix", "attack"),
                ("attack-matrix", "eps"), ("attack-matrix", "select"), ("run", "out")}
API_OF = {"pretrain": api.pretrain, "finetune": api.finetune, "attack-matrix": api.attack_matrix,
          "run": api.run_study}


def _cli_defaults(command: str) -> dict:
    callback = next(c.callback for c in cli.app.registered_commands if (c.name or c.callback.__name__) == command)
    return {name: getattr(p.default, "default", p.default) for name, p in inspect.signature(callback).parameters.items()}


@pytest.mark.parametrize("command", sorted(API_OF))
def test_the_api_takes_every_cli_option_with_its_default(command):
    api_params = inspect.signature(API_OF[command]).parameters
    for name, default in _cli_defaults(command).items():
        api_name = RENAMED.get(command, {}).get(name, name)
        assert api_name in api_params, f"transferlab {command} --{name.replace('_', '-')} has no API argument {api_name}"
        if (command, name) in SAME_MEANING or default is Ellipsis:
            continue
        api_default = api_params[api_name].default
        if isinstance(default, Path):
            api_default = Path(api_default)
        assert api_default == default, (command, name, api_default, default)


def test_min_steps_and_force_reach_training(tmp_path):
    common = dict(dataset="mnist-sample", n=100, batch_size=50, device="cpu", out=tmp_path)
    run = transferlab.pretrain(model="mlp", epochs=1, min_steps=6, **common)
    assert run.config["epochs"] == {"asked": 1, "used": 3, "min_steps": 6, "steps": 6}
    with pytest.raises(transferlab.UserError, match="different finished run"):
        transferlab.pretrain(model="mlp", epochs=2, min_steps=0, **common)
    again = transferlab.pretrain(model="mlp", epochs=2, min_steps=0, force=True, precision="fp32", **common)
    assert again.config["epochs"]["used"] == 2 and again.config["numerics"]["precision"] == "fp32"


def test_run_study_takes_set_overrides(tmp_path):
    from test_study import write_study

    with pytest.raises(transferlab.UserError, match=r"train\.epochs \(from --set\)"):
        transferlab.run_study(write_study(tmp_path), tmp_path / "o", dry_run=True, overrides=["train.epochs=0"])


# ------------------------------------------------------------------ in-memory models
def _net(classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 32), nn.ReLU(), nn.Linear(32, classes))


def _trained(dataset: str, steps: int = 40, start: nn.Module | None = None, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = start if start is not None else _net()
    images, labels = transferlab.load_dataset(dataset, "train")
    x, y = images.float() / 255, labels
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(steps):
        batch = torch.randint(0, len(x), (64,))
        loss = nn.functional.cross_entropy(net(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net


@pytest.fixture(scope="module")
def nets():
    import copy

    kmnist, fmnist = _trained("kmnist-sample"), _trained("fmnist-sample", seed=1)
    tuned = _trained("mnist-sample", start=copy.deepcopy(kmnist), steps=20)
    return kmnist, fmnist, tuned


def test_in_memory_models_are_attacked_like_runs(nets, tmp_path):
    kmnist, fmnist, tuned = nets
    before = {k: v.clone() for k, v in tuned.state_dict().items()}
    tables = transferlab.attack_matrix(
        sources={"k": kmnist, "f": (fmnist, "fmnist")}, targets={"t": tuned}, label_spaces={"k": "kmnist"},
        fine_tuned_from={"t": "k"}, dataset="mnist-sample", attack="fgsm", eps=[0.1], samples=60, device="cpu",
        out=tmp_path / "m", report=False)
    cells = tables.cells.set_index(["crafted_on", "evaluated"])
    assert set(cells.index) >= {("k", "t"), ("f", "t"), ("k", "k"), ("f", "f"), ("t", "t")}
    # Sources of other classes: attacked away from their own predictions, scored against them.
    assert cells.loc[("k", "t"), "label_policy"] == "pred" and cells.loc[("k", "k"), "reference_labels"] == \
        "own clean predictions"
    assert cells.loc[("k", "k"), "clean_accuracy"] == 1.0
    assert cells.loc[("t", "t"), "reference_labels"] == "true labels"
    # Lineage from fine_tuned_from: t descends from k, so k's row is "same pretraining" and lineage.csv compares.
    assert bool(cells.loc[("k", "t"), "same_pretraining"]) and not bool(cells.loc[("f", "t"), "same_pretraining"])
    assert list(tables.lineage[["finetuned", "pretrained_from", "other_pretrained"]].itertuples(index=False, name=None)) == \
        [("t", "k", "f")]
    # The scores are the module's own: the clean accuracy equals the user's module on the same sample set.
    sample = json.loads((tmp_path / "m" / "sample_set.json").read_text())
    images, labels = transferlab.load_dataset("mnist-sample", "test")
    x = images[sample["indices"]].float() / 255
    with torch.no_grad():
        own = (tuned(x).argmax(1) == labels[sample["indices"]]).float().mean().item()
    assert cells.loc[("t", "t"), "clean_accuracy"] == pytest.approx(own)
    # Adversarial sets stay in their eps ball; the user's module is not changed.
    for path in (tmp_path / "m" / "adversarial").rglob("*.safetensors"):
        assert (load_file(str(path))["adversarial"] - x).abs().max() <= 0.1 + 1e-6
    assert all(torch.equal(before[k], v) for k, v in tuned.state_dict().items())
    saved = json.loads((tmp_path / "m" / "in-memory" / "t" / "run.json").read_text())
    assert saved["model"]["family"] == "in-memory:Sequential" and saved["source"]["name"] == "k"


def test_in_memory_runs_mix_with_run_directories(nets, tmp_path):
    kmnist, _, _ = nets
    target = transferlab.pretrain(model="mlp", dataset="mnist-sample", n=100, epochs=1, min_steps=0, device="cpu",
                                  out=tmp_path / "runs")
    tables = transferlab.attack_matrix(sources={"k": kmnist}, targets=[target], label_spaces={"k": "kmnist"},
                                       dataset="mnist-sample", attack="fgsm", eps=0.1, samples=40, device="cpu",
                                       out=tmp_path / "m", report=False)
    assert {("k", target.name), (target.name, target.name)} <= set(zip(tables.cells["crafted_on"], tables.cells["evaluated"]))


@pytest.mark.slow  # over 0.7 s on 2 cores: the full suite (--all) runs it
def test_in_memory_mistakes_are_one_line_errors(nets, tmp_path):
    kmnist, _, tuned = nets
    common = dict(dataset="mnist-sample", attack="fgsm", eps=0.1, samples=20, device="cpu", out=tmp_path / "m")
    with pytest.raises(transferlab.UserError, match="give its label space"):
        transferlab.attack_matrix(sources={"k": kmnist}, targets={"t": tuned}, **common)
    with pytest.raises(transferlab.UserError, match="not a torch nn.Module"):
        transferlab.attack_matrix(sources={"k": "weights.pt"}, targets={"t": tuned}, label_spaces={"k": "kmnist"},
                                  **common)
    with pytest.raises(transferlab.UserError, match="gives 5 logits"):
        transferlab.attack_matrix(sources={"k": _net(5)}, targets={"t": tuned}, label_spaces={"k": "kmnist"},
                                  **common)
    with pytest.raises(transferlab.UserError, match="forward pass"):
        transferlab.attack_matrix(sources={"k": nn.Linear(3, 10)}, targets={"t": tuned},
                                  label_spaces={"k": "kmnist"}, **common)
    with pytest.raises(transferlab.UserError, match="not a name"):
        transferlab.attack_matrix(sources={"../k": kmnist}, targets={"t": tuned}, label_spaces={"../k": "kmnist"},
                                  **common)
    # The saved run of an in-memory model reloads only in the call that had the module.
    transferlab.attack_matrix(sources={"k": kmnist}, targets={"t": tuned}, label_spaces={"k": "kmnist"}, **common)
    with pytest.raises(transferlab.UserError, match="lived only in the Python session"):
        transferlab.load_run(tmp_path / "m" / "in-memory" / "k")
    assert not api._IN_MEMORY


@pytest.mark.slow  # docs/api.md's example: a matrix with its figures
def test_docs_in_memory_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "docs" / "api.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 2, "docs/api.md has no in-memory example"
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[1], "docs/api.md (in-memory)", "exec"), {})
    assert (tmp_path / "results" / "api-demo" / "in-memory" / "in-memory" / "mine" / "run.json").is_file()
