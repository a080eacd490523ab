"""The attack matrix: craft once per (model, attack, eps), evaluate every model on every set.

Every cell shares one seeded, stratified sample set of the target data's test split, so
cells are paired and can be compared sample by sample (McNemar). Adversarial sets and
per-sample correctness are cached under the output directory, keyed by content, so a
second run, or one with an extra target, crafts nothing that already exists.

Rows of the result are tidy: one per (crafted-on model, evaluated model, attack, eps, seed).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from transferlab import attacks, data as data_mod, stats, store
from transferlab.errors import UserError
from transferlab.device import check_precision, choose_numerics, predict, resolve_device, to_float
from transferlab.training import progress_console

MATRIX_SCHEMA = 2
CELL_COLUMNS = [
    "source", "target", "source_dataset", "target_dataset", "source_model", "target_model",
    "source_pretrain_dataset", "target_pretrain_dataset", "source_role", "target_role", "attack", "eps", "steps",
    "label_policy", "reference_labels", "seed", "samples", "clean_correct", "clean_accuracy", "adversarial_correct",
    "adversarial_accuracy", "attack_success_rate", "ci_low", "ci_high", "same_pretraining", "white_box",
    "target_n", "target_freeze", "attack_params", "adversarial_set", "craft_numerics", "eval_numerics",
]
LINEAGE_COLUMNS = [
    "target", "target_model", "own_source", "other_source", "attack", "eps", "seed", "samples", "acc_own",
    "acc_other", "difference", "diff_ci_low", "diff_ci_high", "own_only_correct", "other_only_correct",
    "mcnemar_statistic", "mcnemar_p", "method",
]


@dataclass
class Member:
    """One run taking part in the matrix, as a crafter (row), an evaluated model (column), or both."""

    run_dir: Path
    info: dict
    role: str  # "source" (pretrained) or "target" (fine-tuned / from scratch)
    weights_sha256: str

    @property
    def name(self) -> str:
        return self.info["name"]

    @property
    def dataset(self) -> str:
        return self.info["dataset"]["name"]

    @property
    def label_space(self) -> str:
        return self.info["dataset"]["label_space"]

    @property
    def model(self) -> str:
        return self.info["model"]["family"]

    @property
    def pretrain_dataset(self):
        return self.info.get("lineage", {}).get("pretrain_dataset")

    @property
    def source_sha256(self):
        """The weights hash of the run this one was fine-tuned from (None for pretrain/scratch)."""
        return (self.info.get("source") or {}).get("weights_sha256")

    @property
    def pretraining_root(self) -> str:
        """Which pretrained weights this model descends from: its source's, or its own."""
        return self.source_sha256 or self.weights_sha256


@dataclass
class AttackSetting:
    name: str
    eps: float
    params: dict  # fully resolved torchattacks parameters, recorded with every row


@dataclass
class MatrixResult:
    out_dir: Path
    cells: pd.DataFrame
    lineage: pd.DataFrame
    crafted: int = 0  # adversarial sets crafted in this call (the rest came from the cache)
    reused: int = 0
    seconds: float = 0.0
    examples_file: Path | None = None
    timings: dict = field(default_factory=dict)

    def summary(self) -> str:
        return (f"{len(self.cells)} cells ({self.crafted} adversarial sets crafted, {self.reused} reused) "
                f"in {self.seconds:.1f}s -> {self.out_dir}")


def load_members(run_dirs: list[Path], role: str) -> list[Member]:
    members = []
    for run_dir in run_dirs:
        run_dir = Path(run_dir)
        info = store.read_run_info(run_dir)
        weights = run_dir / store.WEIGHTS_FILE
        if not weights.is_file():
            raise UserError(f"checkpoint missing: {weights}; the run did not finish, re-run it")
        members.append(Member(run_dir, info, role, store.file_sha256(weights)))
    return members


def select_runs(runs_dir: Path, pattern: str) -> list[Path]:
    """Finished run directories under ``runs_dir`` whose name matches the glob ``pattern``."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise UserError(f"--runs-dir {runs_dir} does not exist")
    return sorted(p for p in runs_dir.glob(pattern) if store.is_finished_run(p))


def _validate(sources: list[Member], targets: list[Member], dataset_name: str) -> str:
    if not sources:
        raise UserError("no source runs given; pass --sources RUN_DIR... (or --runs-dir DIR --select 'pre_*')")
    if not targets:
        raise UserError("no target runs given; pass --targets RUN_DIR... (or --runs-dir DIR: every run there that is not a source)")
    canvases = {m.info["dataset"]["canvas"] for m in sources + targets}
    if len(canvases) > 1:
        detail = ", ".join(f"{m.name}={m.info['dataset']['canvas']}" for m in sources + targets)
        raise UserError(f"runs were trained on different canvases ({detail}); attack only runs on one canvas")
    for target in targets:
        if target.dataset != dataset_name:
            raise UserError(f"target {target.name} was trained on {target.dataset}, not on --dataset {dataset_name}; "
                            f"pass --dataset {target.dataset} or drop that target")
    names = [m.name for m in sources + targets]
    shared = {m.name for m in sources} & {m.name for m in targets}
    if len(set(names)) != len(names) - len(shared):
        raise UserError("two different runs share one name; give each run a unique --name")
    return canvases.pop()


def _same_pretraining(crafter: Member, evaluated: Member) -> bool:
    return crafter.pretraining_root == evaluated.pretraining_root


def _set_key(crafter: Member, setting: AttackSetting, policy: str, sample_fingerprint: str, seed: int,
             numerics: str) -> str:
    return store.content_key({
        "schema": MATRIX_SCHEMA, "weights": crafter.weights_sha256, "attack": setting.name, "eps": setting.eps,
        "params": setting.params, "labels": policy, "samples": sample_fingerprint, "seed": seed,
        "numerics": numerics,
    })


def _eps_label(eps: float) -> str:
    return f"{eps:.4g}"


def _load_correctness(path: Path, key: str, samples: int) -> dict:
    """Cached per-sample results for one adversarial set; anything damaged or foreign is dropped with a warning."""
    loaded = store.load_checked_tensors(path, "matrix cache file", expect={"key": key})
    if loaded is None:
        return {}
    tensors, _ = loaded
    bad = [name for name, t in tensors.items()
           if t.dtype != torch.uint8 or tuple(t.shape) != (samples,) or bool((t > 1).any())]
    if bad:
        warnings.warn(f"matrix cache file {path} holds results of the wrong shape or type; evaluating again",
                      stacklevel=2)
        return {}
    return tensors


def _load_cached_set(path: Path, key: str, clean: torch.Tensor, eps: float):
    """A cached adversarial set, or None (with a warning) when it is damaged, foreign, mis-shaped or off its eps ball."""
    loaded = store.load_checked_tensors(path, "adversarial set", expect={"key": key})
    if loaded is None:
        return None
    adversarial = loaded[0].get("adversarial")
    try:
        if adversarial is None or adversarial.dtype != clean.dtype:
            raise attacks.AttackBoundError("no float 'adversarial' tensor")
        attacks.check_eps_ball(clean, adversarial.to(clean.device), eps)
    except attacks.AttackBoundError as exc:
        warnings.warn(f"adversarial set {path} is unusable ({exc}); crafting it again", stacklevel=2)
        return None
    return adversarial.to(clean.device)


def run_matrix(
    *, sources: list[Path], targets: list[Path], dataset: str, attack_names: list[str], eps_values: list[float],
    steps: int | None = None, alpha: float | None = None, attack_options: dict | None = None,
    samples: int = 5000, label_policy: str = "auto", seed: int = 0, device: str = "auto", white_box: bool = True,
    data=None, out_dir: Path = Path("results/matrix"), batch_size: int = 1000,
    eval_batch_size: int = 4096, examples: int = 6, progress: bool = True, craft_fn=None,
    keep_white_box_sets: bool = False, precision: str = "auto",
) -> MatrixResult:
    """Craft on every source (and, with ``white_box``, every target), evaluate every model, write tidy tables.

    ``craft_fn`` defaults to :func:`transferlab.attacks.craft`; tests pass a counting wrapper.
    """
    from transferlab.runs import DataOptions

    started = time.perf_counter()
    craft_fn = craft_fn or attacks.craft
    data = data or DataOptions()
    if label_policy not in attacks.LABEL_POLICIES:
        raise UserError(f"unknown --labels {label_policy!r}; use one of {', '.join(attacks.LABEL_POLICIES)}")
    if not eps_values:
        raise UserError("no eps given; pass e.g. --eps 0.1,0.2,0.3")
    from transferlab.runs import _check_seed

    _check_seed(seed)
    for flag, value in (("--batch-size", batch_size), ("--samples", samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{flag} must be a whole number of at least 1, got {value!r}")
    precision = check_precision(precision)
    attack_names = [attacks.resolve_attack(a) for a in attack_names]
    # steps/alpha may come as --steps/--alpha or as attack options (--attack-opt steps=1); one of each.
    attack_options = dict(attack_options or {})
    for key, flag in (("steps", steps), ("alpha", alpha)):
        if key in attack_options:
            if flag is not None:
                raise UserError(f"{key} given twice: as --{key} and as the attack option {key}=; keep one")
            if key == "steps":
                steps = attack_options.pop(key)
            else:
                alpha = attack_options.pop(key)
    settings = [AttackSetting(a, e, attacks.attack_params(a, e, steps=steps, alpha=alpha, **(attack_options or {})))
                for a in attack_names for e in eps_values]
    dataset_name = data_mod.resolve_name(dataset)
    source_members = load_members(sources, "source")
    target_members = load_members(targets, "target")
    canvas = _validate(source_members, target_members, dataset_name)
    out_dir = store.ensure_writable_dir(out_dir, "matrix output directory")
    torch_device = resolve_device(device)

    ds = data_mod.load(dataset_name, canvas=canvas, data_dir=data.data_dir, download=data.download,
                       cache_dir=data.cache_dir)
    if samples > len(ds.test):
        raise UserError(f"--samples {samples} is larger than the {dataset_name} test split ({len(ds.test)} images)")
    sample_index = data_mod.stratified_subset(ds.test.labels, samples, seed)
    images_u8 = ds.test.images[sample_index]
    labels = ds.test.labels[sample_index]
    sample_fingerprint = store.content_key({"test": ds.fingerprint("test"), "n": samples, "seed": seed})

    # Crafters are the sources, then (white-box diagonal) targets that are not sources already.
    crafters = list(source_members)
    if white_box:
        crafters += [t for t in target_members if t.weights_sha256 not in {s.weights_sha256 for s in crafters}]
    evaluated = list(target_members) + [s for s in source_members
                                        if s.weights_sha256 not in {t.weights_sha256 for t in target_members}]

    clean_images = to_float(images_u8.to(torch_device))
    models: dict[str, torch.nn.Module] = {}
    numerics: dict[str, object] = {}

    def model_of(member: Member) -> torch.nn.Module:
        if member.weights_sha256 not in models:
            model, _ = store.load_run(member.run_dir, torch_device)
            # One decision per model for crafting and evaluation: both run its forward (and backward) passes.
            decision = choose_numerics(model, torch_device, precision, batch_size=batch_size,
                                       sample_shape=tuple(images_u8.shape[1:]), workload="attack")
            decision.apply(model).eval()
            models[member.weights_sha256], numerics[member.weights_sha256] = model, decision
        return models[member.weights_sha256]

    def numerics_of(member: Member):
        model_of(member)
        return numerics[member.weights_sha256]

    def result_key(member: Member) -> str:  # results depend on the numerics they were computed with
        return f"{member.weights_sha256}|{numerics_of(member).label}"

    # What "correct" means for each evaluated model. A model trained on the target's label space is scored
    # against the true labels. A source with other classes (KMNIST characters on MNIST digits) has no right
    # answer here, so it is scored against its own clean predictions: its "accuracy" is then the share of
    # predictions the attack failed to change (clean accuracy 100% by construction).
    reference, reference_kind, clean_correct = {}, {}, {}
    for member in evaluated:
        clean_pred = predict(model_of(member), clean_images, torch_device, eval_batch_size, numerics_of(member))
        if member.label_space == ds.spec.label_space or member.dataset == dataset_name:
            reference[member.weights_sha256], reference_kind[member.weights_sha256] = labels, "true labels"
        else:
            reference[member.weights_sha256], reference_kind[member.weights_sha256] = clean_pred, "own clean predictions"
        clean_correct[member.weights_sha256] = clean_pred == reference[member.weights_sha256]

    adv_dir = out_dir / "adversarial"
    correct_dir = out_dir / "correct"
    rows, per_sample = [], {}
    applied_policy: dict[str, str] = {}
    crafted = reused = 0
    craft_seconds = eval_seconds = 0.0
    example_sets: dict[str, torch.Tensor] = {}
    progress_bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), disable=not progress, console=progress_console())
    with progress_bar:
        task = progress_bar.add_task("attack matrix", total=len(crafters) * len(settings))
        for crafter in crafters:
            for setting in settings:
                progress_bar.update(task, description=f"{setting.name} eps={_eps_label(setting.eps)} on {crafter.name}")
                target_space = ds.spec.label_space
                policy = attacks.choose_label_policy(label_policy, crafter.label_space, crafter.dataset,
                                                     target_space, dataset_name)
                applied_policy[crafter.name] = policy
                key = _set_key(crafter, setting, policy, sample_fingerprint, seed, numerics_of(crafter).label)
                set_id = f"{crafter.name}__{setting.name.replace(':', '-')}_{_eps_label(setting.eps)}__{key}"
                set_path = adv_dir / f"{set_id}.safetensors"
                correct_path = correct_dir / f"{set_id}.safetensors"
                cached = _load_correctness(correct_path, key, samples)
                missing = [m for m in evaluated if result_key(m) not in cached]
                wants_examples = crafter.role == "source" and len(example_sets) < 12 and setting == settings[-1]
                adversarial = None
                t0 = time.perf_counter()
                if missing or wants_examples:
                    adversarial = _load_cached_set(set_path, key, clean_images, setting.eps)
                    if adversarial is None:
                        model = model_of(crafter)
                        # "pred" labels come from the same predict() the cells are scored with (same precision).
                        attack_y = (predict(model, clean_images, torch_device, eval_batch_size,
                                            numerics_of(crafter)).to(torch_device)
                                    if policy == "pred" else labels.to(torch_device))
                        # A constructor seed (APGD, Square, ...) would collide with craft's own seed keyword.
                        params = dict(setting.params)
                        if "seed" in params:
                            params["attack_seed"] = params.pop("seed")
                        adversarial = craft_fn(model, clean_images, attack_y, setting.name, setting.eps,
                                               batch_size=batch_size, seed=seed,
                                               precision=numerics_of(crafter).precision, **params).detach()
                        # Sources' sets are what later targets are measured on, so they are kept. A target's
                        # white-box set is kept only on request: a full grid has one per target and setting.
                        if crafter.role == "source" or keep_white_box_sets:
                            store.save_checked_tensors(set_path, {"adversarial": adversarial}, metadata={
                                "crafter": crafter.name, "attack": setting.name, "eps": str(setting.eps),
                                "label_policy": policy, "samples": sample_fingerprint, "key": key})
                        crafted += 1
                    else:
                        reused += 1
                else:
                    reused += 1  # every evaluated model's result on this set is already on disk
                craft_seconds += time.perf_counter() - t0
                if wants_examples:
                    example_sets[crafter.name] = adversarial[:examples].cpu()

                t0 = time.perf_counter()
                for member in missing:
                    cached[result_key(member)] = (predict(model_of(member), adversarial, torch_device,
                                                          eval_batch_size, numerics_of(member))
                                                  == reference[member.weights_sha256]).to(torch.uint8)
                if missing:
                    store.save_checked_tensors(correct_path, cached, metadata={"key": key})
                eval_seconds += time.perf_counter() - t0

                for member in evaluated:
                    adv_ok = cached[result_key(member)].bool()
                    rows.append(_cell_row(crafter, member, setting, policy, seed, clean_correct[member.weights_sha256],
                                          adv_ok, set_id, reference_kind[member.weights_sha256],
                                          numerics_of(crafter).label, numerics_of(member).label))
                    per_sample[(crafter.name, member.name, setting.name, setting.eps)] = adv_ok
                progress_bar.advance(task)

    cells = integer_columns(pd.DataFrame(rows, columns=CELL_COLUMNS))
    lineage = _lineage_tests(source_members, target_members, settings, per_sample, seed, samples)
    store.atomic_write_text(out_dir / "cells.csv", cells.to_csv(index=False))
    store.atomic_write_text(out_dir / "lineage.csv", lineage.to_csv(index=False))
    examples_file = None
    if example_sets:
        examples_file = out_dir / "examples.safetensors"
        tensors = {"clean": clean_images[:examples].cpu()}
        tensors.update({f"adv/{name}": t for name, t in example_sets.items()})
        store.atomic_save_tensors(examples_file, tensors, metadata={
            "attack": settings[-1].name, "eps": str(settings[-1].eps)})
    store.atomic_write_json(out_dir / "sample_set.json", {
        "dataset": dataset_name, "canvas": canvas, "samples": samples, "seed": seed,
        "fingerprint": sample_fingerprint, "test_fingerprint": ds.fingerprint("test"),
        "indices": sample_index.tolist(),
    })
    seconds = time.perf_counter() - started
    by_sha = {m.weights_sha256: m for m in source_members + target_members}
    store.atomic_write_json(out_dir / "matrix.json", {
        "schema": MATRIX_SCHEMA, "dataset": dataset_name, "canvas": canvas, "samples": samples, "seed": seed,
        "label_policy": label_policy, "white_box": white_box,
        # What was actually applied: the policy per crafter, the labels each evaluated model is scored against,
        # and the precision / memory layout of crafting and of scoring (one decision per model: --precision).
        "label_policy_applied": applied_policy,
        "reference_labels": {by_sha[sha].name: kind for sha, kind in reference_kind.items()},
        "precision": precision,
        "numerics": {
            "crafting": {m.name: numerics_of(m).record() for m in crafters},
            "evaluation": {m.name: numerics_of(m).record() for m in evaluated},
        },
        "attacks": [{"attack": s.name, "eps": s.eps, "params": s.params} for s in settings],
        "sources": [str(m.run_dir) for m in source_members], "targets": [str(m.run_dir) for m in target_members],
        "crafted": crafted, "reused": reused, "seconds": round(seconds, 3),
        "craft_seconds": round(craft_seconds, 3), "eval_seconds": round(eval_seconds, 3),
        "device": str(torch_device), "versions": store.versions(), "data_provenance": ds.provenance,
    })
    return MatrixResult(out_dir, cells, lineage, crafted, reused, seconds, examples_file,
                        {"craft": craft_seconds, "eval": eval_seconds})


# Counts and settings that are whole numbers; a missing value (fgsm has no steps) must not turn them into floats.
INTEGER_COLUMNS = ("steps", "seed", "samples", "clean_correct", "adversarial_correct", "target_n", "target_freeze",
                   "own_only_correct", "other_only_correct")


def integer_columns(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with its integer columns as nullable integers (5, not 5.0, in every CSV)."""
    for column in INTEGER_COLUMNS:
        if column in table.columns:
            table[column] = pd.to_numeric(table[column]).round().astype("Int64")
    return table


def _cell_row(crafter: Member, member: Member, setting: AttackSetting, policy: str, seed: int,
              clean_ok: torch.Tensor, adv_ok: torch.Tensor, set_id: str, reference_labels: str,
              craft_numerics: str, eval_numerics: str) -> dict:
    n = len(clean_ok)
    clean_correct = int(clean_ok.sum())
    adversarial_correct = int(adv_ok.sum())
    # Success counts only samples the evaluated model got right when clean: a miss it already made is no success.
    flipped = int((clean_ok & ~adv_ok).sum())
    low, high = stats.wilson_interval(adversarial_correct, n)
    dataset_info = member.info["dataset"]
    return {
        "source": crafter.name, "target": member.name,
        "source_dataset": crafter.dataset, "target_dataset": member.dataset,
        "source_model": crafter.model, "target_model": member.model,
        "source_pretrain_dataset": crafter.pretrain_dataset, "target_pretrain_dataset": member.pretrain_dataset,
        "source_role": crafter.role, "target_role": member.role,
        "attack": setting.name, "eps": setting.eps, "steps": setting.params.get("steps"),
        "label_policy": policy, "reference_labels": reference_labels, "seed": seed, "samples": n,
        "clean_correct": clean_correct, "clean_accuracy": clean_correct / n,
        "adversarial_correct": adversarial_correct, "adversarial_accuracy": adversarial_correct / n,
        "attack_success_rate": flipped / clean_correct if clean_correct else float("nan"),
        "ci_low": low, "ci_high": high,
        "same_pretraining": _same_pretraining(crafter, member),
        "white_box": crafter.weights_sha256 == member.weights_sha256,
        "target_n": (dataset_info.get("subset") or {}).get("n"),
        "target_freeze": (member.info.get("freeze") or {}).get("n"),
        "attack_params": store.json_compact(setting.params), "adversarial_set": set_id,
        "craft_numerics": craft_numerics, "eval_numerics": eval_numerics,
    }


def _lineage_tests(sources: list[Member], targets: list[Member], settings: list[AttackSetting],
                   per_sample: dict, seed: int, samples: int) -> pd.DataFrame:
    """For each fine-tuned target: own source's examples vs each other source of the same architecture."""
    rows = []
    for target in targets:
        own = next((s for s in sources if s.weights_sha256 == target.source_sha256), None)
        if own is None:
            continue
        others = [s for s in sources if s is not own and s.model == own.model]
        for setting in settings:
            own_ok = per_sample[(own.name, target.name, setting.name, setting.eps)]
            for other in others:
                other_ok = per_sample[(other.name, target.name, setting.name, setting.eps)]
                test = stats.mcnemar_test(own_ok.numpy(), other_ok.numpy())
                diff = stats.paired_difference(own_ok.numpy(), other_ok.numpy())
                rows.append({
                    "target": target.name, "target_model": target.model, "own_source": own.name,
                    "other_source": other.name, "attack": setting.name, "eps": setting.eps, "seed": seed,
                    "samples": samples, "acc_own": int(own_ok.sum()) / len(own_ok),
                    "acc_other": int(other_ok.sum()) / len(other_ok), "difference": diff["difference"],
                    "diff_ci_low": diff["ci_low"], "diff_ci_high": diff["ci_high"],
                    "own_only_correct": test["a_only"], "other_only_correct": test["b_only"],
                    "mcnemar_statistic": test["statistic"], "mcnemar_p": test["p_value"], "method": test["method"],
                })
    return integer_columns(pd.DataFrame(rows, columns=LINEAGE_COLUMNS))
