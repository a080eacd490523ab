"""The training engine: one plain loop over a dataset that lives on the device.

Why it is fast: the whole split is one uint8 tensor moved to the device once; a batch
is an index slice of it, converted to float on the device. There is no DataLoader, no
per-sample PIL work, and no host-device synchronisation inside a step (the loss and
accuracy are accumulated on the device and read every ``log_every`` steps). On CUDA the
forward pass runs under bf16 autocast and the optimizer is fused.
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
    amp: bool = True  # bf16 autocast, CUDA only
    channels_last: bool = False
    compile: bool = False
    eval_batch_size: int = 2048
    log_every: int = 25

    def validate(self) -> "TrainConfig":
        if self.epochs < 1:
            raise UserError(f"--epochs must be at least 1 (got {self.epochs})")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if not self.lr > 0:
            raise UserError(f"--lr must be positive (got {self.lr})")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {self.optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}")
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"--label-smoothing must be in [0, 1) (got {self.label_smoothing})")
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"--val-fraction must be in [0, 1) (got {self.val_fraction})")
        if self.augment_shift < 0:
            raise UserError(f"--augment-shift must be 0 or more pixels (got {self.augment_shift})")
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
    """Use every core this process may run on (torch's default can count cores we don't own)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, cores))
    return torch.get_num_threads()


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA; a no-op elsewhere (CPU bf16 is slower than fp32 for these small nets)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def to_float(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [0, 1], on whatever device the tensor is."""
    return images_uint8.float().div_(255.0)


# -------------------------------------------------------------------- evaluation
@torch.inference_mode()
def predict(model: torch.nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 2048,
            amp: bool = True) -> torch.Tensor:
    """Argmax predictions (int64, on CPU) for uint8 or float [0, 1] images, in large batches."""
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
    return (predict(model, images, device, batch_size, amp) == labels.cpu()).float().mean().item()


# ----------------------------------------------------------------- augmentation
def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by its own random (dy, dx) in [-max_shift, max_shift], zero-filled."""
    n, c, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4)
    shifts = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator).to(images.device)
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
    """torch.compile when asked and supported; otherwise the model as it is, with a note why."""
    if not enabled:
        return model
    try:
        return torch.compile(model)
    except Exception as exc:  # noqa: BLE001 - compile support varies by platform; eager always works
        print(f"note: torch.compile unavailable here ({exc.__class__.__name__}); running eagerly")
        return model


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

    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format)
    train_images = images.to(device).contiguous(memory_format=memory_format)
    train_labels = labels.to(device)
    n = len(train_labels)
    steps_per_epoch = math.ceil(n / config.batch_size)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise UserError("every parameter is frozen, so there is nothing to train; lower --freeze")
    optimizer = _make_optimizer(trainable, config, device)
    schedule = _make_schedule(optimizer, config, config.epochs * steps_per_epoch)
    step_model = maybe_compile(model, config.compile)

    result = FitResult(val_indices=val_indices)
    started = time.perf_counter()
    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("epoch {task.fields[epoch]}"),
        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("acc {task.fields[acc]:.2%}"),
        TextColumn("{task.fields[ips]:,.0f} img/s"), TimeElapsedColumn(), TimeRemainingColumn(),
        disable=not progress, transient=False,
    )
    with bar:
        task = bar.add_task(description, total=config.epochs * steps_per_epoch, epoch=f"0/{config.epochs}",
                            loss=float("nan"), acc=0.0, ips=0.0)
        for epoch in range(1, config.epochs + 1):
            set_train_mode(model)
            epoch_start = time.perf_counter()
            order = torch.randperm(n, generator=generator).to(device)
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            seen_since_log = seen = 0
            for step in range(steps_per_epoch):
                index = order[step * config.batch_size:(step + 1) * config.batch_size]
                x = to_float(train_images[index])
                if config.augment_shift:
                    x = random_shift(x, config.augment_shift, generator)
                y = train_labels[index]
                with autocast(device, config.amp):
                    logits = step_model(x)
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if schedule is not None:
                    schedule.step()
                loss_sum += loss.detach() * len(y)
                correct += (logits.detach().argmax(1) == y).sum()
                seen += len(y)
                seen_since_log += 1
                if progress and (seen_since_log >= config.log_every or step == steps_per_epoch - 1):
                    elapsed = time.perf_counter() - epoch_start
                    bar.update(task, advance=seen_since_log, epoch=f"{epoch}/{config.epochs}",
                               loss=loss_sum.item() / seen, acc=correct.item() / seen, ips=seen / max(elapsed, 1e-9))
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
    result.images_per_second = config.epochs * n / max(result.seconds, 1e-9)
    model.eval()
    return result
