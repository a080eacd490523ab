"""How long a study's steps would take on this machine: the serial sum and the critical path (the longest chain
of dependent steps, the wall time with unlimited workers), each with the compute-once paths ("after") and
without them ("before": every fine-tune epoch runs the whole forward pass, every eval target runs its whole
model). ``--dry-run`` prints it.

The model, and what it leaves out (kept simple on purpose; each assumption is one line here):

- A step's seconds = the image passes it makes x the seconds one image pass of its model takes here. The passes
  come from the plan: a training step makes epochs x training images forward+backward passes (epochs raised to
  min_steps as fit raises them, the validation share held out and scored each epoch), then scores its training
  images and the test split once; a craft step makes samples x attack iterations forward+backward passes to the
  input (matrix_work's count), plus one scoring pass of a white-box set it does not keep; an eval step makes
  samples x sets forward passes per model it scores. Merge steps only read files and count as 0.
- Seconds per image are measured here, once per model family (and freeze) per process (_MEASURED), on random
  images of the study's canvas, on one thread (on a busy machine several threads wait for each other after
  every op; one waits for none), then divided by the speedup of the plan's thread count over one, measured once
  on a forward pass (below 1 where another program holds the cores, as the run would find it). Calls
  take turns in rounds after a warm-up, and each call's fastest round counts (_per_image). Frozen-model costs
  are tied to the family's through the whole forward pass, timed alongside them (FrozenCosts). TIMING_BATCH
  images per call, fewer than the study's batches: per-image costs fall with batch size, so this leans high.
  fp32 (channels_last for conv nets, what the calibration picks on CPUs without bf16 units) unless the study
  asks for bf16. Training is timed as forward+backward without the optimizer's update. The line says the load
  average the timings were taken under.
- The frozen prefix (transferlab.prefix) is cut from the model's graph exactly as fine-tuning and the attack
  matrix cut it. A frozen prefix records no autograd graph, so a full-forward fine-tune step costs the prefix's
  forward plus the tail's step; with the cache the prefix runs once per training image and each epoch costs the
  tail's step alone. prefix.decide says whether the cache applies (augmentation, BatchNorm statistics, FLOPs
  per byte); where it does not, both estimates time the whole frozen model's step. An eval step whose models
  share a prefix (plan._shared_prefix_groups) runs it once per image and each model's tail; "before", each
  model runs whole.
- Left out: start-up, loading data and checkpoints, the optimizer's update, clean predictions and predictor
  profiles (once per model per process: about 2% of the reference grid's crafting passes), the frontier cache
  being memory-mapped from disk, steps overlapping on shared cores. Models from outside the zoo are not built
  by a dry run (the trust model), so their steps are counted as not estimated. Class counts are taken as 10
  (only the classifier's last layer depends on it). Steps already done cost 0.
"""

from __future__ import annotations

import os
import re
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from transferlab import prefix
from transferlab.config import augmentation_of
from transferlab.data.canvas import get_canvas
from transferlab.data.registry import NPZ_PREFIX, TorchvisionSource, default_data_dir, registry_entry, resolve_name
from transferlab.device import Numerics, device_name, has_conv2d, pinned_threads, resolve_device
from transferlab.machine import usable_cores
from transferlab.errors import UserError
from transferlab.model_registry import FAMILY_CLASSES
from transferlab.models import create_model, freeze, freeze_count_for, set_train_mode
from transferlab.study.plan import TRAIN_KINDS, Step
from transferlab.training import TrainConfig, epochs_for

TIMING_BATCH = 32  # images per timed call: per image within ~5% of batch 128 on one thread, quicker
SPEEDUP_BATCH = 64  # images per forward pass when timing the plan's threads against one (_Timer.speedup)
ROUNDS = (2, 5)  # timed rounds after the warm-up, at least and at most (_per_image)
STEADY = 0.2  # enough rounds once every call's two fastest agree within 20%
BUDGET_S = 0.5  # or once one model's rounds have taken this long
TOTAL_BUDGET_S = 6.0  # past this much timing in one estimate (a machine too busy to time), one round per model
CLASSES = 10
_SPLIT_SIZES = re.compile(r"([\d,]+) train / ([\d,]+) test")
_MEASURED: dict[tuple, object] = {}  # timings of this process, by device, threads, canvas and model


# ---------------------------------------------------------------- per-image costs, measured here
@dataclass
class FamilyCosts:
    """Seconds per image of one model family on this machine."""

    step: float  # forward+backward, every parameter trainable (pretrain, scratch)
    forward: float  # eval-mode forward without gradients (scoring)
    attack: float  # eval-mode forward+backward to the input (crafting)
    speedup: float = 1.0  # the plan's threads against one thread (_Timer.speedup): the costs above include it


@dataclass
class FrozenCosts:
    """Costs per image of one family with its first ``n`` tensors frozen, in units of the family's whole forward
    pass, timed alongside: the load changes between two timings, not within one, so these scale with the
    FamilyCosts.forward timed at another moment."""

    step_full: float  # a fine-tune step through the whole model (the prefix only forward)
    cache: tuple[float, float] | None  # (prefix forward once per image, tail step per epoch), when it applies
    shared_eval: tuple[float, float] | None  # eval prefix and eval tail as shares of the whole forward (sum 1)
    why: str = ""


def _per_image(calls: dict, batch: int, device: torch.device, least: int = ROUNDS[0]) -> dict[str, float]:
    """Seconds per image of each call: one warm-up each (the first call picks kernels and allocates), then rounds
    in which the calls take turns, so that a change in the machine's load hits them alike and their ratios hold.
    Each call's fastest round counts (what the machine does when its load lets it); rounds go on, up to
    ROUNDS[1], until every call's two fastest agree within STEADY, or for at most BUDGET_S after ``least``."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    started = None
    while True:
        for name, call in calls.items():
            begun = time.perf_counter()
            call()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if started is not None:
                times[name].append(time.perf_counter() - begun)
        if started is None:  # the warm-up round is over
            started = time.perf_counter()
        rounds = len(next(iter(times.values())))
        steady = all(len(t) > 1 and sorted(t)[1] <= (1 + STEADY) * min(t) for t in times.values())
        if rounds >= ROUNDS[1] or (rounds >= least and (steady or time.perf_counter() - started > BUDGET_S)):
            return {name: min(seconds) / batch for name, seconds in times.items()}


@dataclass
class _Timer:
    """Builds the models and times them on random images of the canvas, each once per process."""

    device: torch.device
    threads: int  # the plan's, which its steps compute with
    shape: tuple[int, int, int]
    seconds: float = 0.0  # spent timing by this estimate (what earlier ones in this process timed is reused)

    def _build(self, family: str, options: dict, precision: str) -> tuple[torch.nn.Module, Numerics]:
        """The model with random weights on the device, in the precision and layout a run would take (fp32 where
        the study leaves it to the calibration; channels_last for conv nets on a CPU)."""
        model = create_model(family, num_classes=CLASSES, in_channels=self.shape[0], image_size=self.shape[1],
                             **options)
        numerics = Numerics("bf16" if precision == "bf16" else "fp32",
                            has_conv2d(model) and self.device.type == "cpu")
        return model.to(self.device, memory_format=numerics.memory_format), numerics

    def _images(self, numerics: Numerics, batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        batch = batch or TIMING_BATCH
        generator = torch.Generator().manual_seed(0)
        x = torch.rand((batch, *self.shape), generator=generator).to(self.device)
        y = torch.randint(0, CLASSES, (batch,), generator=generator).to(self.device)
        return x.contiguous(memory_format=numerics.memory_format), y

    def _measured(self, key: tuple, measure):
        key = (str(self.device), self.threads, self.shape, *key)
        if key not in _MEASURED:
            started = time.perf_counter()
            # On a CPU the costs are timed on one thread, which waits for no other: on a busy machine the plan's
            # threads wait for each other after every op, and a small timed batch waits as often as a large one.
            # The plan's threads come in through each family's measured speedup.
            with pinned_threads(1 if self.device.type == "cpu" else self.threads), torch.random.fork_rng(devices=[]):
                _MEASURED[key] = measure()
            self.seconds += time.perf_counter() - started
        return _MEASURED[key]

    def family(self, family: str, options: dict, precision: str) -> FamilyCosts:
        """The family's costs on the plan's threads: timed on one, divided by the speedup."""
        key = ("family", family, repr(sorted(options.items())), precision)
        one = self._measured(key, lambda: self._time_family(family, options, precision))
        speedup = self.speedup(family, options, precision)
        return FamilyCosts(one.step / speedup, one.forward / speedup, one.attack / speedup, speedup)

    def speedup(self, family: str, options: dict, precision: str) -> float:
        """How many times faster a forward pass of SPEEDUP_BATCH images runs on the plan's threads than on one,
        the two taking turns (the fastest round of each): measured once, on the first model asked for, and taken
        for every cost (a backward pass is the same kind of convolutions and matrix products, and the zoo's
        families gain alike). Below 1 where another program holds the cores: the plan's threads then wait for
        it, as the run's would."""
        if self.device.type != "cpu" or self.threads == 1:
            return 1.0
        return self._measured(("speedup",), lambda: self._time_speedup(family, options, precision))

    def _time_speedup(self, family: str, options: dict, precision: str) -> float:
        model, numerics = self._build(family, options, precision)
        x, _ = self._images(numerics, SPEEDUP_BATCH)
        forward = self._forward(model, (x,), numerics, model.eval)

        def on(threads: int):
            def call():
                with pinned_threads(threads):
                    forward()
            return call
        timed = _per_image({"one": on(1), "plan": on(self.threads)}, SPEEDUP_BATCH, self.device, self._least())
        return timed["one"] / timed["plan"]

    def frozen_costs(self, family: str, options: dict, precision: str, n: int | str, train: dict) -> FrozenCosts:
        key = ("frozen", family, repr(sorted(options.items())), precision, n, train["bn_stats"],
               augmentation_of(train) is not None)
        return self._measured(key, lambda: self._time_frozen(family, options, precision, n, train))

    def _least(self) -> int:
        return ROUNDS[0] if self.seconds < TOTAL_BUDGET_S else 1

    def _per_image(self, calls: dict) -> dict[str, float]:
        return _per_image(calls, TIMING_BATCH, self.device, self._least())

    def _step(self, net, inputs: tuple, y, numerics: Numerics, mode):
        """A call that puts ``net`` in its mode (``mode(net)``) and takes a forward+backward pass on ``inputs``."""
        def call():
            mode()
            with numerics.autocast(self.device):
                loss = F.cross_entropy(net(*inputs).float(), y)
            loss.backward()
            net.zero_grad(set_to_none=True)
        return call

    def _forward(self, net, inputs: tuple, numerics: Numerics, mode):
        def call():
            mode()
            with torch.no_grad(), numerics.autocast(self.device):
                net(*inputs)
        return call

    def _time_family(self, family: str, options: dict, precision: str) -> FamilyCosts:
        model, numerics = self._build(family, options, precision)
        x, y = self._images(numerics)

        def train():
            model.train()
            model.requires_grad_(True)

        def attack():  # as crafting runs: eval mode, gradients to the input only
            model.eval()
            model.requires_grad_(False)

        timed = self._per_image({"step": self._step(model, (x,), y, numerics, train),
                                 "forward": self._forward(model, (x,), numerics, model.eval),
                                 "attack": self._step(model, (x.clone().requires_grad_(True),), y, numerics, attack)})
        return FamilyCosts(timed["step"], timed["forward"], timed["attack"])

    def _time_frozen(self, family: str, options: dict, precision: str, n, train: dict) -> FrozenCosts:
        """The training split prefix.decide takes (cached prefix once, then the tail's steps), else the frozen
        model's whole step; and the eval-mode split the attack matrix shares, as shares of prefix + tail (the two
        run one after the other are the whole forward pass)."""
        model, numerics = self._build(family, options, precision)
        freeze(model, freeze_count_for(model, n) if isinstance(n, str) else int(n))
        frozen = {id(p) for p in model.parameters() if not p.requires_grad}
        x, y = self._images(numerics)
        sample = x[:prefix.SAMPLE_BATCH]
        train_mode = lambda: set_train_mode(model, train["bn_stats"])  # noqa: E731
        train_mode()
        decision = prefix.decide(model, sample, numerics, augmentation=augmentation_of(train),
                                 bn_stats=train["bn_stats"])
        model.eval()
        split = prefix.split_model(model, sample, numerics, frozen) if frozen else "nothing is frozen"
        calls = {"forward": self._forward(model, (x,), numerics, model.eval)}
        if decision.split is not None:
            calls["prefix"] = self._forward(decision.split.prefix, (x,), numerics, train_mode)
            frontier = self._frontier(decision.split, x, numerics, train_mode)
            calls["tail step"] = self._step(decision.split.tail, frontier, y, numerics, train_mode)
        else:
            calls["step"] = self._step(model, (x,), y, numerics, train_mode)
        if isinstance(split, prefix.Split):
            if decision.split is None or split.prefix.code != decision.split.prefix.code:
                calls["eval prefix"] = self._forward(split.prefix, (x,), numerics, model.eval)
            calls["eval tail"] = self._forward(split.tail, self._frontier(split, x, numerics, model.eval), numerics,
                                               model.eval)
        timed = self._per_image(calls)
        cache = (timed["prefix"] / timed["forward"], timed["tail step"] / timed["forward"]) \
            if decision.split is not None else None
        shared = None
        if isinstance(split, prefix.Split):  # the same graph in both modes (frozen BatchNorm): timed once
            eval_prefix = timed.get("eval prefix", timed.get("prefix"))
            whole = eval_prefix + timed["eval tail"]
            shared = (eval_prefix / whole, timed["eval tail"] / whole)
        return FrozenCosts(sum(cache) if cache else timed["step"] / timed["forward"], cache, shared, decision.reason)

    def _frontier(self, split: prefix.Split, x, numerics: Numerics, mode) -> tuple:
        mode()
        with torch.no_grad(), numerics.autocast(self.device):
            return tuple(t.detach() for t in split.prefix(x))


# ---------------------------------------------------------------- image passes, from the plan
def split_size(dataset: str, split: str, data_dir: Path | None = None) -> int | None:
    """Images in a dataset's ``split`` ("train" or "test"), without loading it: an npz folder's array header, the
    labels file of a local IDX copy under ``data_dir`` (a partial copy holds fewer images than the set's
    nominal size: KMNIST's offline train split has 7,011 of 60,000), else the registry's description
    ("60,000 train / 10,000 test"); None when none says."""
    name = resolve_name(dataset)
    if name.startswith(NPZ_PREFIX):
        return _npz_rows(Path(name[len(NPZ_PREFIX):]) / f"{split}.npz")
    spec, source = registry_entry(name)
    local = _idx_rows(source, split, data_dir or default_data_dir())
    if local is not None:
        return local
    match = _SPLIT_SIZES.search(spec.description)
    return int(match.group(1 if split == "train" else 2).replace(",", "")) if match else None


def _idx_rows(source, split: str, root: Path) -> int | None:
    """Images in a split of a local uncompressed IDX copy, from its labels file's length (8 header bytes, then one
    byte a label), which is what torchvision reads; None for other sources or a copy not there."""
    if not isinstance(source, TorchvisionSource):
        return None
    labels = [f for f in source.files if f.endswith("labels-idx1-ubyte")]  # the train split's first
    if len(labels) != 2:
        return None
    path = root / source.folder / labels[0 if split == "train" else 1]
    return path.stat().st_size - 8 if path.is_file() else None


def _npz_rows(path: Path) -> int | None:
    try:
        with zipfile.ZipFile(path) as archive, archive.open("x.npy") as handle:
            version = np.lib.format.read_magic(handle)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            return int(read(handle)[0][0])
    except (OSError, KeyError, ValueError, IndexError, zipfile.BadZipFile):
        return None


def _origin(step: Step, by_id: dict[str, Step]) -> Step:
    """The pretrain or scratch step that names a training step's model (a fine-tune's source)."""
    while step.kind == "finetune":
        step = by_id[step.inputs[0]]
    return step


def _in_zoo(step: Step) -> bool:
    return str(step.config["model"]).strip().lower() in FAMILY_CLASSES


def _freeze_of(step: Step) -> int | str | None:
    if step.kind != "finetune":
        return None
    return step.config.get("freeze") or step.config.get("freeze_to") or None


def _train_seconds(step: Step, by_id: dict[str, Step], timer: _Timer,
                   data_dir: Path | None) -> tuple[float, float] | None:
    """(after, before) seconds of a training step, or None when it cannot be estimated here."""
    origin, train, data = _origin(step, by_id), step.config["train"], step.config["data"]
    # The subset asked for, at most what the split holds (either may be unknown: None).
    n = min(filter(None, (data["n"], split_size(data["dataset"], "train", data_dir))), default=None)
    test = split_size(data["dataset"], "test", data_dir)
    if not _in_zoo(origin) or n is None or test is None:
        return None
    n_val = max(round(n * train["val_fraction"]), CLASSES) if train["val_fraction"] else 0  # as fit holds out
    epochs = epochs_for(TrainConfig(epochs=train["epochs"], batch_size=train["batch_size"],
                                    min_steps=train["min_steps"]), n - n_val)
    images = epochs * (n - n_val)
    model = (origin.config["model"], origin.config["options"], train["precision"])
    costs = timer.family(*model)
    scoring = (n + test + epochs * n_val) * costs.forward  # train, test and validation accuracy
    freeze_n = _freeze_of(step)
    if freeze_n is None:
        seconds = images * costs.step + scoring
        return seconds, seconds
    frozen = timer.frozen_costs(*model, freeze_n, train)
    before = images * frozen.step_full * costs.forward + scoring
    if frozen.cache is None:
        return before, before
    prefix_x, tail_x = frozen.cache
    return (n * prefix_x + images * tail_x) * costs.forward + scoring, before


def _craft_seconds(step: Step, by_id: dict[str, Step], timer: _Timer, scope: str) -> float | None:
    crafters = [by_id[i] for i in step.config["crafter"]]
    if not all(_in_zoo(_origin(c, by_id)) for c in crafters):
        return None
    evaluation = step.config["evaluation"]
    costs = [timer.family(_origin(c, by_id).config["model"], _origin(c, by_id).config["options"],
                          evaluation["precision"]) for c in crafters]
    seconds = evaluation["samples"] * (step.config["attack"]["steps"] or 1) * sum(c.attack for c in costs)
    if step.config["role"] == "target" and scope == "sources":  # the set is scored on its target, not kept
        seconds += evaluation["samples"] * costs[0].forward
    return seconds


def _eval_seconds(step: Step, by_id: dict[str, Step], timer: _Timer) -> tuple[float, float] | None:
    ids = step.config["evaluated"]
    members = [by_id[i] for i in (ids if isinstance(ids, list) else [ids])]
    origins = [_origin(m, by_id) for m in members]
    if not all(_in_zoo(o) for o in origins):
        return None
    evaluation = step.config["evaluation"]
    images = evaluation["samples"] * len(step.config["attack"]["eps"])
    before = images * sum(timer.family(o.config["model"], o.config["options"], evaluation["precision"]).forward
                          for o in origins)
    freeze_n = _freeze_of(members[0])
    if len(members) < 2 or freeze_n is None:
        return before, before
    frozen = timer.frozen_costs(origins[0].config["model"], origins[0].config["options"], evaluation["precision"],
                                freeze_n, members[0].config["train"])
    if frozen.shared_eval is None:
        return before, before
    prefix_share, tail_share = frozen.shared_eval
    forward = timer.family(origins[0].config["model"], origins[0].config["options"], evaluation["precision"]).forward
    return images * forward * (prefix_share + len(members) * tail_share), before  # shares sum to 1: <= before


# ---------------------------------------------------------------- the estimate
def critical_path(steps: list[Step], seconds: dict[str, float]) -> float:
    """The longest chain of dependent steps (steps in plan order, inputs first), in seconds: the wall time
    with as many workers as there are steps ready."""
    finish: dict[str, float] = {}
    for step in steps:
        finish[step.id] = seconds.get(step.id, 0.0) + max((finish.get(i, 0.0) for i in step.inputs), default=0.0)
    return max(finish.values(), default=0.0)


@dataclass
class Estimate:
    where: str  # "AMD EPYC, 2 threads, load average 2.1 on 2 cores"
    steps: list[Step]
    after: dict[str, float]  # step id -> seconds with the compute-once paths
    before: dict[str, float]  # step id -> seconds computed the old way
    unknown: list[str]  # ids of steps not estimated (models outside the zoo, data sizes unknown)
    measured_s: float  # seconds the timings took

    def serial(self, before: bool = False) -> float:
        return sum((self.before if before else self.after).values())

    def critical(self, before: bool = False) -> float:
        return critical_path(self.steps, self.before if before else self.after)

    def line(self) -> str:
        text = (f"estimate on {self.where}: serial {duration(self.serial())} (without the compute-once paths: "
                f"{duration(self.serial(True))}), critical path {duration(self.critical())} (without: "
                f"{duration(self.critical(True))}); timed in {self.measured_s:.1f} s, start-up and I/O left out")
        if self.unknown:
            text += f"; {len(self.unknown):,} steps not estimated (models outside the zoo or unknown data sizes)"
        return text


def _where(device: torch.device, threads: int, speedup: float | None) -> str:
    """The device, and on a CPU the thread count, its measured speedup and the load the timings were taken under."""
    if device.type != "cpu":
        return device_name(device)
    text = f"{device_name(device)}, {threads} thread{'s' if threads != 1 else ''}"
    if threads > 1 and speedup is not None:
        text += f" ({speedup:.2g}x one thread's speed"
        text += ": another program holds the cores; OMP_NUM_THREADS=1 runs faster here)" if speedup < 1 else ")"
    try:
        return text + f", load average {os.getloadavg()[0]:.1f} on {len(usable_cores())} cores"
    except (OSError, AttributeError):
        return text


def duration(seconds: float) -> str:
    """'42 s', '14 min', '3 h 12 min', '154 h'."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours:,} h" if hours >= 100 or not minutes else f"{hours} h {minutes} min"


def estimate(steps: list[Step], states: dict[str, str], study: dict, device: str | None = None,
             data_dir: Path | None = None) -> Estimate:
    """Seconds of each step (0 for those ``states`` calls done) with and without the compute-once paths;
    ``data_dir``: where the study's data is (preflight.study_data_dir), for the sizes of local copies."""
    where = resolve_device(device or study["study"]["device"])
    canvas = get_canvas(study["data"]["canvas"])
    threads = steps[0].threads if steps else 1
    timer = _Timer(where, threads, (canvas.channels, canvas.size, canvas.size))
    by_id = {s.id: s for s in steps}
    after, before, unknown = {}, {}, []
    for step in steps:
        if states.get(step.id) == "done" or step.kind == "merge":
            found = (0.0, 0.0)
        elif step.kind in TRAIN_KINDS:
            found = _train_seconds(step, by_id, timer, data_dir)
        elif step.kind == "craft":
            found = _craft_seconds(step, by_id, timer, study["evaluation"]["scope"])
            found = found if found is None else (found, found)
        else:
            found = _eval_seconds(step, by_id, timer)
        if found is None:
            unknown.append(step.id)
            found = (0.0, 0.0)
        after[step.id], before[step.id] = found
    speedup = _MEASURED.get((str(where), threads, timer.shape, "speedup"))
    return Estimate(_where(where, threads, speedup), steps, after, before, unknown, timer.seconds)


def describe(steps: list[Step], states: dict[str, str], study: dict, device: str | None = None,
             data_dir: Path | None = None) -> str:
    """The dry run's estimate line; a device that is not here gives a line saying so rather than an error."""
    try:
        return estimate(steps, states, study, device, data_dir).line()
    except UserError as exc:
        return f"no time estimate: {exc}"
