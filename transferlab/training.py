"""The training engine: one plain loop over a dataset that lives on the device.

Why it is fast: the whole split is one uint8 tensor moved to the device once; a batch
is an index slice of it, converted to float on the device. There is no DataLoader, no
per-sample PIL work, and no host-device synchronisation inside a step (the loss and
accuracy are accumulated on the device and read every ``log_every`` steps). The forward
pass runs under bf16 autocast on CUDA and on CPUs with native bf16 arithmetic; models with
2-D convolutions run channels_last; on CUDA the optimizer is fused. Every one of these was
kept because bench/train.py measured a gain (numbers in bench/RESULTS.md).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from transferlab.errors import UserError

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "onecycle", "constant")
# The least number of optimizer steps a run takes: 10 epochs of 1,000 images at batch 128 are only
# 80 steps, and KMNIST -> MNIST at n = 1,000 then stopped at 86% test (88% train) where the reference
# reached 94%. The budget must follow the work, not the epoch count, so small data gets more epochs.
# TrainConfig(min_steps=None) means this value (read when validated, so a test may lower it).
DEFAULT_MIN_STEPS = 600


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    schedule: str = "cosine"
    label_smoothing: float = 0.0
    augment_shift: int = 0  # random translation of up to this many pixels, done on the device
    val_fraction: float = 0.0  # held-out share of the training split, reported per epoch
    bn_stats: str = "frozen"  # "frozen": BatchNorm layers whose parameters are all frozen keep their statistics
    amp: bool = True  # bf16 autocast on CUDA and on CPUs with native bf16 (see autocast)
    channels_last: bool = True  # NHWC for models with 2-D convolutions (see use_channels_last)
    compile: bool = False  # torch.compile; falls back to eager if it fails, at creation or at the first step
    eval_batch_size: int = 2048  # capped at CPU_EVAL_BATCH on CPU (see predict)
    log_every: int = 25
    min_steps: int | None = None  # None: DEFAULT_MIN_STEPS; 0 trains exactly `epochs` epochs

    def validate(self) -> "TrainConfig":
        if self.epochs < 1:
            raise UserError(f"--epochs must be at least 1 (got {self.epochs})")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"--lr must be positive (got {self.lr})")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {self.optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise UserError(f"--weight-decay must be 0 or more (got {self.weight_decay})")
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"--label-smoothing must be in [0, 1) (got {self.label_smoothing})")
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"--val-fraction must be in [0, 1) (got {self.val_fraction})")
        if self.augment_shift < 0:
            raise UserError(f"--augment-shift must be 0 or more pixels (got {self.augment_shift})")
        if self.min_steps is None:
            self.min_steps = DEFAULT_MIN_STEPS
        if self.min_steps < 0:
            raise UserError(f"--min-steps must be 0 or more (got {self.min_steps})")
        if self.bn_stats not in ("frozen", "update"):
            raise UserError(f"--bn-stats must be 'frozen' or 'update' (got {self.bn_stats!r})")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    images_per_second: float = 0.0
    val_indices: torch.Tensor | None = None
    epochs_asked: int = 0
    epochs_used: int = 0
    steps: int = 0


def epochs_for(config: TrainConfig, n: int) -> int:
    """The epochs a run on n images takes: the ones asked, raised until it makes min_steps optimizer steps."""
    steps_per_epoch = max(1, math.ceil(n / config.batch_size))
    min_steps = DEFAULT_MIN_STEPS if config.min_steps is None else config.min_steps
    return max(config.epochs, math.ceil(min_steps / steps_per_epoch))


# ---------------------------------------------------------------------- devices
def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an explicit device that is absent is an error."""
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but CUDA is not available here; use --device cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name} asked for, but MPS is not available here; use --device cpu or auto")
    return device


def configure_cpu_threads() -> int:
    """One thread per core this process may use (affinity, cgroup quota); OMP_NUM_THREADS, if set, wins.

    The count depends only on the machine's configuration, never on its momentary load: the
    thread count changes the order of floating-point reductions, and the same seed on the same
    device must give the same numbers. When another busy process shares the cores, set
    OMP_NUM_THREADS=1: torch's OpenMP threads meet at a barrier after every op, and on a
    2-core VM with the other core busy a resnet step ran 5x slower with 2 threads than with 1
    (bench/RESULTS.md); with both cores free, 2 threads were faster.
    """
    if os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        threads = int(os.environ["OMP_NUM_THREADS"])
    else:
        threads = len(_usable_cores())
    torch.set_num_threads(max(1, threads))
    return torch.get_num_threads()


def _usable_cores() -> list[int]:
    """The cores this process may run on, trimmed to a cgroup CPU quota (containers)."""
    try:
        cores = sorted(os.sched_getaffinity(0))
    except AttributeError:
        cores = list(range(os.cpu_count() or 1))
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            cores = cores[:max(1, int(int(quota) / int(period)))]
    except (OSError, ValueError):
        pass
    return cores


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX). Without it oneDNN
    emulates bf16 and autocast would only slow these small nets down."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA, and on CPUs with native bf16, where bench/train.py measured it
    1.5-2x faster than fp32 at the same accuracy; a no-op elsewhere."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=uses_bf16(device, enabled))


def uses_bf16(device: torch.device, enabled: bool = True) -> bool:
    """Whether ``autocast`` runs bf16 on ``device``."""
    return enabled and (device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()))


def use_channels_last(model: torch.nn.Module, enabled: bool = True) -> bool:
    """channels_last pays off only where there are 2-D convolutions (on CPU: 1.2-1.7x for the
    conv nets, mostly from max-pooling and convolution kernels that are fast in NHWC)."""
    return enabled and any(isinstance(m, torch.nn.Conv2d) for m in model.modules())


def numerics(model: torch.nn.Module, device: torch.device, amp: bool = True, channels_last: bool = True) -> dict:
    """How ``model`` computes here, for provenance: what ``autocast`` and ``use_channels_last`` decide.

    Every output that records precision or memory layout gets it from this one function, so a
    change in how they are chosen (a --precision option, say) is recorded without further edits.
    """
    bf16 = uses_bf16(torch.device(device), amp)
    return {"precision": "bf16 autocast" if bf16 else "fp32",
            "memory_format": "channels_last" if use_channels_last(model, channels_last) else "contiguous"}


def to_float(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [0, 1], on whatever device the tensor is."""
    return images_uint8.float().div_(255.0)


# -------------------------------------------------------------------- evaluation
# On CPU a batch past a few hundred 28x28 images no longer fits in cache: resnet inference
# ran 2,500 img/s at 256 and 1,100 img/s at 2048 (bench/RESULTS.md). GPUs want large batches.
CPU_EVAL_BATCH = 256


@torch.inference_mode()
def predict(model: torch.nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 2048,
            amp: bool = True) -> torch.Tensor:
    """Argmax predictions (int64, on CPU) for uint8 or float [0, 1] images, in large batches
    (at most CPU_EVAL_BATCH on CPU, where larger ones are slower)."""
    if device.type == "cpu":
        batch_size = min(batch_size, CPU_EVAL_BATCH)
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(device, non_blocking=True)
        if batch.dtype == torch.uint8:
            batch = to_float(batch)
        with autocast(device, amp):
            out.append(model(batch).argmax(dim=1))
    model.train(was_training)
    return torch.cat(out).cpu() if out else torch.empty(0, dtype=torch.long)


def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
             batch_size: int = 2048, amp: bool = True) -> float:
    if len(labels) == 0:
        return float("nan")
    # From the count, in float64: a float32 mean turns 201/2000 into 0.10049999, which a report rounds down.
    return int((predict(model, images, device, batch_size, amp) == labels.cpu()).sum()) / len(labels)


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
    """Progress bars go to stderr, so stdout holds only results and can be piped or parsed."""
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)


def fit(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, config: TrainConfig,
        device: torch.device, seed: int = 0, description: str = "train", progress: bool = True,
        set_train_mode=None) -> FitResult:
    """Train ``model`` in place on uint8 ``images`` [N, C, H, W] and int64 ``labels``.

    ``set_train_mode(model)`` puts the model in training mode each epoch; the default is
    ``model.train()``. Fine-tuning passes one that keeps frozen BatchNorm layers in eval.
    """
    config.validate()
    if device.type == "cpu":
        configure_cpu_threads()
    generator = torch.Generator().manual_seed(seed)
    set_train_mode = set_train_mode or (lambda m: m.train())

    val_images = val_labels = None
    val_indices = None
    if config.val_fraction > 0:
        from transferlab.data import stratified_subset

        n_val = max(int(round(len(labels) * config.val_fraction)), int(labels.max()) + 1)
        val_indices = stratified_subset(labels, n_val, seed)
        keep = torch.ones(len(labels), dtype=torch.bool)
        keep[val_indices] = False
        val_images, val_labels = images[val_indices], labels[val_indices]
        images, labels = images[keep], labels[keep]

    channels_last = use_channels_last(model, config.channels_last)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format)
    train_images = images.to(device).contiguous(memory_format=memory_format)
    train_labels = labels.to(device)
    n = len(train_labels)
    steps_per_epoch = math.ceil(n / config.batch_size)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise UserError("every parameter is frozen, so there is nothing to train; lower --freeze")
    optimizer = _make_optimizer(trainable, config, device)
    epochs = epochs_for(config, n)
    schedule = _make_schedule(optimizer, config, epochs * steps_per_epoch)
    step_model = maybe_compile(model, config.compile)
    first_step_pending = step_model is not model  # a compiled model proves itself on the first step

    def forward_backward(net, x, y):
        with autocast(device, config.amp):
            logits = net(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return logits, loss

    result = FitResult(val_indices=val_indices, epochs_asked=config.epochs, epochs_used=epochs,
                       steps=epochs * steps_per_epoch)
    started = time.perf_counter()
    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("epoch {task.fields[epoch]}"),
        TextColumn("loss {task.fields[loss]}"), TextColumn("acc {task.fields[acc]}"),
        TextColumn("{task.fields[ips]} img/s"), TimeElapsedColumn(), TimeRemainingColumn(),
        disable=not progress, transient=False, console=progress_console(),
    )
    with bar:
        task = bar.add_task(description, total=epochs * steps_per_epoch, epoch=f"0/{epochs}",
                            loss="-", acc="-", ips="-")  # nothing measured yet: no "loss nan" frame
        for epoch in range(1, epochs + 1):
            set_train_mode(model)
            epoch_start = time.perf_counter()
            order = torch.randperm(n, generator=generator).to(device)
            if config.augment_shift:  # a whole epoch's shifts in one host-to-device copy
                shifts = torch.randint(0, 2 * config.augment_shift + 1, (2, n), generator=generator).to(device)
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            seen_since_log = seen = 0
            for step in range(steps_per_epoch):
                batch = slice(step * config.batch_size, (step + 1) * config.batch_size)
                index = order[batch]
                x = to_float(train_images[index])
                if config.augment_shift:
                    x = shift_images(x, shifts[:, batch], config.augment_shift)
                y = train_labels[index]
                if first_step_pending:
                    logits, loss, step_model = _first_compiled_step(forward_backward, step_model, model, x, y)
                    first_step_pending = False
                else:
                    logits, loss = forward_backward(step_model, x, y)
                optimizer.step()
                if schedule is not None:
                    schedule.step()
                loss_sum += loss.detach() * len(y)
                correct += (logits.detach().argmax(1) == y).sum()
                seen += len(y)
                seen_since_log += 1
                if progress and (seen_since_log >= config.log_every or step == steps_per_epoch - 1):
                    elapsed = time.perf_counter() - epoch_start
                    bar.update(task, advance=seen_since_log, epoch=f"{epoch}/{epochs}",
                               loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.2%}",
                               ips=f"{seen / max(elapsed, 1e-9):,.0f}")
                    seen_since_log = 0
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            epoch_seconds = time.perf_counter() - epoch_start
            record = {
                "epoch": epoch,
                "loss": loss_sum.item() / seen,
                "running_accuracy": correct.item() / seen,
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": round(epoch_seconds, 3),
                "images_per_second": round(seen / max(epoch_seconds, 1e-9), 1),
            }
            if val_images is not None:
                record["val_accuracy"] = accuracy(model, val_images, val_labels, device, config.eval_batch_size, config.amp)
            result.history.append(record)
            if not progress:
                continue
            bar.update(task, completed=epoch * steps_per_epoch)
    result.seconds = time.perf_counter() - started
    result.images_per_second = epochs * n / max(result.seconds, 1e-9)
    model.eval()
    return result


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
