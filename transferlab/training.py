"""The training engine: one plain loop over a dataset that lives on the device.

Why it is fast: the whole split is one uint8 tensor moved to the device once; a batch
is an index slice of it, converted to float on the device. There is no DataLoader, no
per-sample PIL work, and no host-device synchronisation inside a step (the loss and
accuracy are accumulated on the device and read every ``log_every`` steps). Precision
(bf16 autocast or fp32) and memory layout (channels_last for conv nets) are chosen per
machine and model by measurement (device.choose_numerics); on CUDA the optimizer is fused.
Every one of these was kept because bench/train.py measured a gain (bench/RESULTS.md).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from transferlab.device import (  # noqa: F401 - re-exported: these lived here before device.py
    CPU_EVAL_BATCH, Numerics, usable_cores, accuracy, check_precision, choose_numerics, configure_cpu_threads,
    cpu_has_native_bf16, predict, resolve_device, to_float,
)
from transferlab import config as settings, prefix, terminal
from transferlab.config import Optimizer, Schedule, TrainConfig  # noqa: F401 - TrainConfig lived here before config.py
from transferlab.errors import UserError
from transferlab.data import stratified_subset

OPTIMIZERS = tuple(Optimizer)
SCHEDULES = tuple(Schedule)


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    images_per_second: float = 0.0
    val_indices: torch.Tensor | None = None
    numerics: Numerics = Numerics()
    epochs_asked: int = 0
    epochs_used: int = 0
    steps: int = 0
    frozen_prefix: dict = field(default_factory=dict)  # which forward path trained, and why (prefix.Decision)
    # Eval-mode accuracy on the images fit was given, from their cached frontiers (None: run the full model).
    fit_images_accuracy: float | None = None


def epochs_for(config: TrainConfig, n: int) -> int:
    """The epochs a run on n images takes: the ones asked, raised until it makes min_steps optimizer steps."""
    steps_per_epoch = max(1, math.ceil(n / config.batch_size))
    min_steps = settings.DEFAULT_MIN_STEPS if config.min_steps is None else config.min_steps
    return max(config.epochs, math.ceil(min_steps / steps_per_epoch))


def epochs_note(config: TrainConfig, epochs: int, steps: int) -> str:
    """The one line fit prints when the step budget raised the epochs asked for."""
    min_steps = settings.DEFAULT_MIN_STEPS if config.min_steps is None else config.min_steps
    return (f"--epochs {config.epochs} raised to {epochs} for {min_steps} optimizer steps ({steps} in all); "
            f"--min-steps 0 keeps {config.epochs}")


# ----------------------------------------------------------------- augmentation
def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by its own random (dy, dx) in [-max_shift, max_shift], zero-filled."""
    shifts = torch.randint(0, 2 * max_shift + 1, (2, images.shape[0]), generator=generator)
    return shift_images(images, shifts.to(images.device), max_shift)


def shift_images(images: torch.Tensor, shifts: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Move the content of image i by max_shift - shifts[:, i] pixels (rows, columns), zero-filled;
    shifts are in [0, 2 * max_shift] and live on the images' device (fit draws a whole epoch's
    at once: one host-to-device copy per epoch instead of one per step)."""
    n, c, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4)
    rows = (torch.arange(h, device=images.device)[None, :] + shifts[0][:, None])  # [n, h]
    cols = (torch.arange(w, device=images.device)[None, :] + shifts[1][:, None])  # [n, w]
    batch_index = torch.arange(n, device=images.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch_index, rows[:, :, None], cols[:, None, :]]  # [n, h, w, c]
    return out.permute(0, 3, 1, 2).contiguous()


def flip_images(images: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirror image i left to right where ``flip[i]`` (a bool tensor on the images' device)."""
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


# ---------------------------------------------------------------------- fitting
def _make_optimizer(params, config: TrainConfig, device: torch.device):
    fused = {"fused": True} if device.type == "cuda" else {}
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, **fused)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, **fused)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                           nesterov=config.momentum > 0, **fused)


def _make_schedule(optimizer, config: TrainConfig, total_steps: int):
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=max(1, total_steps))
    return None


def maybe_compile(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """torch.compile when asked and supported; otherwise the model as it is, with a note why.
    Most failures (no C++ compiler, an unsupported op) only show at the first call: fit
    catches those too and goes on eagerly."""
    if not enabled:
        return model
    try:
        return torch.compile(model)
    except Exception as exc:  # noqa: BLE001 - compile support varies by platform; eager always works
        _compile_note(exc)
        return model


def _compile_note(exc: Exception) -> None:
    print(f"note: torch.compile failed here ({exc.__class__.__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); "
          f"running eagerly")


def progress_console():
    """Progress bars go to stderr, so stdout holds only results and can be piped or parsed. Piped into a
    log file, they get 160 columns (unless COLUMNS says otherwise) rather than rich's 80, which cut the
    elapsed and remaining times off every frame."""
    return terminal.console(stderr=True)


@dataclass
class _Validation:
    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor


def _hold_out_validation(images, labels, fraction: float, seed: int):
    """(training images, training labels, the held-out _Validation or None): a stratified share, at least one
    image per class."""
    if fraction <= 0:
        return images, labels, None
    n_val = max(int(round(len(labels) * fraction)), int(labels.max()) + 1)
    indices = stratified_subset(labels, n_val, seed)
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[indices] = False
    return images[keep], labels[keep], _Validation(images[indices], labels[indices], indices)


class _Stepper:
    """One optimizer step: forward and loss under the run's numerics, backward, optimizer, schedule.
    With torch.compile, the first step is where compilation really happens; if it fails, that step and all
    after it run eagerly (_first_compiled_step)."""

    def __init__(self, model, config: TrainConfig, numerics: Numerics, device: torch.device, total_steps: int,
                 forward=None):
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise UserError("every parameter is frozen, so there is nothing to train; lower --freeze")
        self.config, self.numerics, self.device = config, numerics, device
        self.model = forward if forward is not None else model  # the tail, when the frozen prefix is cached
        self.optimizer = _make_optimizer(trainable, config, device)
        self.schedule = _make_schedule(self.optimizer, config, total_steps)
        self.net = maybe_compile(self.model, config.compile)
        self.first_step_pending = self.net is not self.model

    def forward_backward(self, net, x, y):
        """``x``: the model's inputs, a tuple (one image batch, or the tail's frontier tensors)."""
        with self.numerics.autocast(self.device):
            logits = net(*x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=self.config.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return logits, loss

    def __call__(self, x, y):
        if self.first_step_pending:
            logits, loss, self.net = _first_compiled_step(self.forward_backward, self.net, self.model, x, y)
            self.first_step_pending = False
        else:
            logits, loss = self.forward_backward(self.net, x, y)
        self.optimizer.step()
        if self.schedule is not None:
            self.schedule.step()
        return logits, loss


class _RunningTotals:
    """An epoch's loss and accuracy so far, summed on the device: reading them (.item()) waits for the device,
    so that happens only when the progress bar or the epoch's record needs them."""

    def __init__(self, device: torch.device):
        self.started = time.perf_counter()
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.seen = self.unshown = 0  # images; steps not yet shown on the progress bar

    def add(self, logits, loss, y) -> None:
        self.loss_sum += loss.detach() * len(y)
        self.correct += (logits.detach().argmax(1) == y).sum()
        self.seen += len(y)
        self.unshown += 1

    def shown(self) -> dict:
        """The progress bar's fields, now (and the steps since the last call count as shown)."""
        self.unshown = 0
        elapsed = time.perf_counter() - self.started
        return {"loss": f"{self.loss_sum.item() / self.seen:.4f}", "acc": f"{self.correct.item() / self.seen:.2%}",
                "ips": f"{self.seen / max(elapsed, 1e-9):,.0f}"}

    def record(self, epoch: int, lr: float) -> dict:
        seconds = time.perf_counter() - self.started
        return {"epoch": epoch, "loss": self.loss_sum.item() / self.seen,
                "running_accuracy": self.correct.item() / self.seen, "lr": lr, "seconds": round(seconds, 3),
                "images_per_second": round(self.seen / max(seconds, 1e-9), 1)}


def _progress_bar(progress: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("epoch {task.fields[epoch]}"),
        TextColumn("loss {task.fields[loss]}"), TextColumn("train acc (train mode) {task.fields[acc]}"),
        TextColumn("{task.fields[ips]} img/s"), TimeElapsedColumn(), TimeRemainingColumn(),
        disable=not progress, transient=False, console=progress_console(),
    )


@dataclass(frozen=True)
class FitHooks:
    """What a caller plugs into fit's loop beside the TrainConfig: the progress bar's label and two callbacks.

    ``set_train_mode(model)`` puts the model in training mode each epoch; the default is
    ``model.train()``. Fine-tuning passes one that keeps frozen BatchNorm layers in eval.
    ``on_epoch(record)`` sees each epoch's record as it is appended to the history (``--log``).
    """

    description: str = "train"
    set_train_mode: Callable[[torch.nn.Module], object] | None = None
    on_epoch: Callable[[dict], object] | None = None


def fit(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, config: TrainConfig,
        device: torch.device, seed: int = 0, progress: bool = True, hooks: FitHooks = FitHooks()) -> FitResult:
    """Train ``model`` in place on uint8 ``images`` [N, C, H, W] and int64 ``labels`` (``hooks``: see FitHooks)."""
    config.validate()
    if device.type == "cpu":
        configure_cpu_threads()
    generator = torch.Generator().manual_seed(seed)
    set_train_mode = hooks.set_train_mode or (lambda m: m.train())
    on_epoch = hooks.on_epoch
    images, labels, val = _hold_out_validation(images, labels, config.val_fraction, seed)

    numerics, train_images, train_labels = _to_device(model, images, labels, config, device)
    n = len(train_labels)
    steps_per_epoch = math.ceil(n / config.batch_size)
    epochs = epochs_for(config, n)
    if epochs != config.epochs:  # say what changed: the step budget overrode what was asked
        progress_console().print(epochs_note(config, epochs, epochs * steps_per_epoch), soft_wrap=True)
    started = time.perf_counter()  # the frontier's one-time computation counts in the training time
    # A frozen prefix that is a pure function of the image is computed once here; the steps train the tail.
    set_train_mode(model)
    frozen = prefix.FineTunePrefix.prepare(model, train_images, val.images if val else None, numerics, device, config)
    take_step = _Stepper(model, config, numerics, device, epochs * steps_per_epoch, forward=frozen.tail)

    result = FitResult(val_indices=val.indices if val else None, numerics=numerics, epochs_asked=config.epochs, epochs_used=epochs,
                       steps=epochs * steps_per_epoch, frozen_prefix=frozen.decision.record())
    bar = _progress_bar(progress)
    with bar:
        task = bar.add_task(hooks.description, total=epochs * steps_per_epoch, epoch=f"0/{epochs}",
                            loss="-", acc="-", ips="-")  # nothing measured yet: no "loss nan" frame
        for epoch in range(1, epochs + 1):
            set_train_mode(model)

            def report(totals, last: bool, epoch: int = epoch):
                if progress and (totals.unshown >= config.log_every or last):
                    bar.update(task, advance=totals.unshown, epoch=f"{epoch}/{epochs}", **totals.shown())

            totals = _run_epoch(take_step, frozen, train_images, train_labels, config, generator, device, report)
            record = totals.record(epoch, take_step.optimizer.param_groups[0]["lr"])
            if val is not None:
                record["val_accuracy"] = frozen.val_accuracy(model, val.images, val.labels, device,
                                                             config.eval_batch_size, numerics)
            result.history.append(record)
            if on_epoch is not None:
                on_epoch(record)
            if progress:
                bar.update(task, completed=epoch * steps_per_epoch)
    result.seconds = time.perf_counter() - started
    result.images_per_second = epochs * n / max(result.seconds, 1e-9)
    model.eval()
    result.fit_images_accuracy = frozen.fit_images_accuracy(train_labels, val.labels if val else None, device,
                                                            config.eval_batch_size, numerics)
    return result


def _to_device(model, images: torch.Tensor, labels: torch.Tensor, config: TrainConfig, device: torch.device):
    """The model and the whole training set on the device in the numerics chosen for the training step; the
    images stay uint8 there, and a batch is an index slice of them."""
    model.to(device)
    numerics = choose_numerics(model, device, config.precision, config.channels_last,
                               batch_size=config.batch_size, sample_shape=images.shape[1:], workload="train")
    model.to(memory_format=numerics.memory_format)
    return numerics, images.to(device).contiguous(memory_format=numerics.memory_format), labels.to(device)


def _run_epoch(take_step, frozen, train_images, train_labels, config: TrainConfig, generator, device,
               report) -> "_RunningTotals":
    """One pass over the training set in a fresh random order (drawn from ``generator``: the permutation, then
    the shifts, then the flips); ``report(totals, last_step)`` updates the progress bar."""
    n = len(train_labels)
    steps = math.ceil(n / config.batch_size)
    totals = _RunningTotals(device)
    order = torch.randperm(n, generator=generator).to(device)
    if config.augment_shift:  # a whole epoch's shifts in one host-to-device copy
        shifts = torch.randint(0, 2 * config.augment_shift + 1, (2, n), generator=generator).to(device)
    if config.augment_flip:  # drawn after the shifts: runs without flips keep their numbers
        flips = (torch.rand(n, generator=generator) < 0.5).to(device)
    for step in range(steps):
        batch = slice(step * config.batch_size, (step + 1) * config.batch_size)
        index = order[batch]
        if frozen.tail is not None:
            x = frozen.frontier.batch(index, device)
        else:
            x = to_float(train_images[index])
            if config.augment_shift:
                x = shift_images(x, shifts[:, batch], config.augment_shift)
            if config.augment_flip:
                x = flip_images(x, flips[batch])
            x = (x,)
        y = train_labels[index]
        logits, loss = take_step(x, y)
        totals.add(logits, loss, y)
        report(totals, step == steps - 1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return totals


def _first_compiled_step(forward_backward, compiled, model, x, y):
    """The first step through the compiled model, where compilation really happens. If it
    fails, restore what the attempt may have touched (BatchNorm statistics, the RNG) and
    take the step eagerly: the run then equals an eager one. Returns the model to go on with."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    rng = torch.get_rng_state()
    try:
        logits, loss = forward_backward(compiled, x, y)
    except Exception as exc:  # noqa: BLE001 - any compiler failure: eager always works
        _compile_note(exc)
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        torch.set_rng_state(rng)
        return (*forward_backward(model, x, y), model)
    return logits, loss, compiled
