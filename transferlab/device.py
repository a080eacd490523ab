"""Device concerns in one place: which device, how many threads, and how a model computes there.

How a model computes (bf16 autocast or fp32; channels_last or contiguous memory) is decided by
measurement, not by CPU flags. On a 2-vCPU AMD EPYC, bf16 autocast made resnet training 1.09x
faster; on a 2-vCPU Intel Xeon that reports native bf16 it made it 28% slower (issue 10). So
``precision="auto"`` times a few steps each way, once per (machine, torch version, model
structure, batch size, workload), keeps the faster, and caches the decision in the cache
directory; ``"fp32"`` or ``"bf16"`` skips the timing. Same seed, same device, same decision:
same numbers.
"""

from __future__ import annotations

import copy
import contextlib
import os
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from transferlab import store
from transferlab.calibration_cache import (  # noqa: F401 - re-exported: they lived here
    CALIBRATION_FILE, CALIBRATION_SCHEMA, CalibrationCache, describe_decisions,
)
from transferlab.config import Precision, choice
from transferlab.errors import UserError
from transferlab.machine import (  # noqa: F401 - re-exported: they lived here, and torch-free callers read machine
    INTERESTING_FLAGS, cpu_flags, cpu_has_native_bf16, cpu_model, default_thread_count, usable_cores,
)

PRECISIONS = tuple(Precision)
# Timing batches are capped: the choice between kernels settles well below the largest batches,
# and the calibration must stay short (aim: under 3 s per model on a 2-vCPU machine).
CALIBRATION_BATCH = 128
CALIBRATION_BUDGET_S = 1.0
# bf16 must win by this much to be chosen: fp32 is the more exact of the two, so a tie goes to it.
BF16_MARGIN = 0.05
PROBE_BATCH = 2  # images per step when first sorting out candidates that cannot win (2: BatchNorm needs 2)
# Called as hook(key, decision) after every calibration that actually timed something (tests count them).
CALIBRATION_HOOKS: list = []


# ---------------------------------------------------------------------- devices
def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an explicit device that is absent is an error."""
    name = "auto" if name is None else str(name).lower()  # '' is an unknown device, not a quiet 'auto'
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
    (bench/RESULTS.md); with both cores free, 2 threads were faster. A calibration that measures
    this switches the process to one thread and prints so (_measure_contention).
    """
    threads = thread_count()
    torch.set_num_threads(threads)
    return torch.get_num_threads()


_PINNED_THREADS: list[int] = []  # a study step's thread count, decided once by its plan (pinned_threads)


@contextlib.contextmanager
def pinned_threads(threads: int):
    """Run a study step with the thread count its plan decided, whichever executor runs it: the count changes
    float reductions, so a step keyed with it must compute with it (configure_cpu_threads keeps to it)."""
    previous = torch.get_num_threads()
    _PINNED_THREADS.append(max(1, int(threads)))
    torch.set_num_threads(_PINNED_THREADS[-1])
    try:
        yield
    finally:
        _PINNED_THREADS.pop()
        torch.set_num_threads(previous)


def thread_count() -> int:
    """The thread count configure_cpu_threads sets: a pinned step's (a study decides each step's count once, so
    every executor computes it alike), else OMP_NUM_THREADS if set, else 1 once a calibration in this process
    measured one thread beating all of them (contention, printed when decided), else one per core."""
    if _PINNED_THREADS:
        return _PINNED_THREADS[-1]
    if _contention_threads is not None and not os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        return _contention_threads
    return default_thread_count()


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    return cpu_model()


# --------------------------------------------------------------------- numerics
@dataclass(frozen=True)
class Numerics:
    """How a model computes on a device: its precision and memory layout, and why."""

    precision: str = "fp32"  # "fp32" or "bf16" (bf16 autocast; losses and gradients w.r.t. inputs stay fp32)
    channels_last: bool = False
    decided_by: str = "asked"  # "asked" (an explicit choice) or "measured" (calibration, possibly cached)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    @property
    def label(self) -> str:
        """Compact and stable, for table columns: 'bf16+channels_last', 'fp32+contiguous'."""
        return f"{self.precision}+{'channels_last' if self.channels_last else 'contiguous'}"

    def autocast(self, device: torch.device):
        device = torch.device(device)
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(memory_format=self.memory_format)

    def record(self) -> dict:
        return {"precision": self.precision,
                "memory_format": "channels_last" if self.channels_last else "contiguous",
                "decided_by": self.decided_by,
                "threads": torch.get_num_threads()}  # CPU float reductions depend on it (issue 26)


FP32 = Numerics()


def check_precision(precision: str, flag: str = "--precision") -> str:
    return choice(Precision, precision, flag)


def has_conv2d(model: torch.nn.Module) -> bool:
    """channels_last matters only where there are 2-D convolutions."""
    return any(isinstance(m, torch.nn.Conv2d) for m in model.modules())


def choose_numerics(model: torch.nn.Module, device: torch.device, precision: str = "auto",
                    channels_last: bool = True, *, batch_size: int, sample_shape, workload: str = "train",
                    cache_dir: Path | None = None) -> Numerics:
    """The precision and layout ``model`` will use on ``device`` for ``workload`` ("train": parameter
    gradients; "attack": input gradients, with crafting and evaluation sharing the decision).

    An explicit precision is used as asked, with channels_last for conv nets unless switched off.
    "auto" measures: fp32 and bf16, each with channels_last on and off for conv nets, a few
    forward+backward steps each on random data; the decision is cached per machine and model.
    """
    precision = check_precision(precision)
    device = torch.device(device)
    conv = has_conv2d(model)
    if precision != "auto":
        asked = Numerics(precision, conv and channels_last, "asked")
        if device.type == "cpu" and torch.get_num_threads() > 1:
            _probe_contention_once(model, device, asked, max(1, min(int(batch_size), CALIBRATION_BATCH)),
                                   tuple(sample_shape), workload)
        return asked
    layouts = (True, False) if conv and channels_last else (False,)
    candidates = [Numerics(p, cl, "measured") for p in ("fp32", "bf16") for cl in layouts]
    timing_batch = max(1, min(int(batch_size), CALIBRATION_BATCH))
    key = store.content_key({
        "schema": CALIBRATION_SCHEMA, "device": device.type, "device_name": device_name(device),
        "threads": torch.get_num_threads() if device.type == "cpu" else None, "torch": torch.__version__,
        "model": model_signature(model), "batch_size": int(batch_size), "sample_shape": list(sample_shape),
        "workload": workload, "layouts": list(layouts),
    })
    cache = CalibrationCache(cache_dir)
    cached = cache.get(key)
    if cached is None:
        # Parallel workers on one machine (Ray) take turns: the first measures, the others read its decision
        # rather than timing against each other and deciding differently.
        with cache.measuring():
            cached = cache.get(key, reread=True)
            if cached is None:
                return _calibrate(model, device, _CalibrationRequest(candidates, timing_batch, tuple(sample_shape),
                                                                     workload, int(batch_size), key), cache)
    return Numerics(cached["precision"], cached["channels_last"], "measured")


@dataclass(frozen=True)
class _CalibrationRequest:
    """What one calibration measures (choose_numerics' candidates and timing batch) and files it under."""

    candidates: list[Numerics]
    timing_batch: int
    sample_shape: tuple
    workload: str  # "train" or "attack"
    batch_size: int  # the caller's batch, recorded with the decision
    key: str  # the calibration cache's key


def _calibrate(model, device, request: _CalibrationRequest, cache: "CalibrationCache") -> Numerics:
    candidates, timing_batch, sample_shape, workload = (request.candidates, request.timing_batch,
                                                        request.sample_shape, request.workload)
    started = time.perf_counter()
    # Dropout in the timed copies draws random numbers: fork the generators so that a run that
    # calibrated draws exactly what a run that found the decision cached draws.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        timings = _time_candidates(model, device, candidates, timing_batch, sample_shape, workload)
    best_fp32 = min((c for c in candidates if c.precision == "fp32"), key=lambda c: timings[c.label])
    best_bf16 = min((c for c in candidates if c.precision == "bf16"), key=lambda c: timings[c.label])
    chosen = best_bf16 if timings[best_bf16.label] < (1 - BF16_MARGIN) * timings[best_fp32.label] else best_fp32
    threads = torch.get_num_threads() if device.type == "cpu" else None
    contention = None
    if device.type == "cpu" and threads > 1:
        with torch.random.fork_rng(devices=[]):
            contention = _measure_contention(model, device, chosen, timing_batch, sample_shape, workload,
                                             timings[chosen.label])
    seconds = time.perf_counter() - started
    decision = {
        "precision": chosen.precision, "channels_last": chosen.channels_last,
        "step_ms": {label: round(t * 1000, 2) for label, t in timings.items()},
        "calibration_seconds": round(seconds, 3), "device_name": device_name(device), "device": device.type,
        "threads": threads, "torch": torch.__version__,
        "model": type(model).__name__, "batch_size": request.batch_size, "timing_batch": timing_batch,
        "workload": workload, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        # The machine's load when measured: timings taken while another program held the cores steer nothing
        # later. A contended decision is kept for this process only ("provisional") and measured again next run.
        "load_1min": _load_average(), "cores": len(usable_cores()), "contention": contention,
        "provisional": bool(contention and contention["contended"]),
    }
    cache.put(request.key, decision)
    for hook in CALIBRATION_HOOKS:
        hook(request.key, decision)
    return chosen


def model_signature(model: torch.nn.Module) -> list:
    """The model's structure (class, parameter and buffer names and shapes): family and options,
    without the weights, so one calibration serves every run of the same architecture."""
    return [type(model).__name__,
            [(name, list(t.shape), str(t.dtype)) for name, t in model.named_parameters()],
            [(name, list(t.shape)) for name, t in model.named_buffers()]]


class _CandidateClock:
    """Times a candidate's forward+backward step (``step``) or forward pass (``forward``) on a copy of the model
    per memory layout (timing must not touch the caller's weights or BatchNorm statistics), on fixed random
    inputs."""

    def __init__(self, model, device, candidates, batch: int, sample_shape, workload: str):
        self.device, self.batch, self.workload = device, batch, workload
        generator = torch.Generator().manual_seed(0)
        x = torch.rand((batch, *sample_shape), generator=generator).to(device)
        self.copies = {}
        for layout in {c.channels_last for c in candidates}:
            net = copy.deepcopy(model).to(device)
            net.to(memory_format=torch.channels_last if layout else torch.contiguous_format)
            if workload == "attack":
                net.eval()
                net.requires_grad_(False)
            else:
                net.train()
            self.copies[layout] = net
        with torch.no_grad():
            # two images, not one: a train-mode BatchNorm on a 1x1 map (torchvision ResNets at 28 px) rejects one
            classes = self.copies[candidates[0].channels_last](x[:2]).shape[1]
        self.y = torch.randint(0, classes, (batch,), generator=generator).to(device)
        self.inputs = {layout: x.contiguous(memory_format=torch.channels_last if layout else torch.contiguous_format)
                       for layout in self.copies}

    def step(self, candidate: Numerics, n: int | None = None) -> float:
        n = self.batch if n is None else n
        net = self.copies[candidate.channels_last]
        inp = self.inputs[candidate.channels_last][:n]
        if self.workload == "attack":
            inp = inp.clone().requires_grad_(True)
        t0 = time.perf_counter()
        with candidate.autocast(self.device):
            loss = F.cross_entropy(net(inp).float(), self.y[:n])
        loss.backward()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - t0
        net.zero_grad(set_to_none=True)
        return elapsed

    def forward(self, candidate: Numerics, n: int) -> float:
        net = self.copies[candidate.channels_last]
        t0 = time.perf_counter()
        with torch.no_grad(), candidate.autocast(self.device):
            net(self.inputs[candidate.channels_last][:n])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0


def _time_candidates(model, device, candidates, batch, sample_shape, workload,
                     rounds_at_most: int = 4) -> dict[str, float]:
    """Median seconds per forward+backward step of each candidate, on a copy of the model (timing must
    not touch the caller's weights or BatchNorm statistics), candidates taking turns so that a change
    in the machine's load hits them all alike."""
    clock = _CandidateClock(model, device, candidates, batch, sample_shape, workload)
    small = min(batch, PROBE_BATCH)
    probe, bounded = _probe_candidates(clock, candidates, small)
    best = min(t for label, t in probe.items() if label not in bounded)
    active = [c for c in candidates if c.label not in bounded and probe[c.label] <= 2 * best]
    timings = _median_steps(clock, active, rounds_at_most)
    # Dropped candidates: their probe time scaled to the full batch (recorded; never the fastest; for those
    # dropped on their forward pass, an underestimate of their step).
    timings.update({c.label: probe[c.label] * batch / small for c in candidates if c.label not in timings})
    return timings


def _probe_candidates(clock: _CandidateClock, candidates, small: int) -> tuple[dict[str, float], set[str]]:
    """Each candidate's seconds per step on ``small`` images, and the labels of those bounded out on a forward
    pass alone.

    A probe on a few images first: a candidate more than twice as slow as the best there cannot win, so it
    is not timed at full size. bf16 autocast on a CPU without bf16 units ran 10-20x slower than fp32, and
    timing it at full size made the calibration take 15 s (resnet) to minutes (alexnet) instead of 2.
    fp32 goes first, so that a candidate whose forward pass alone costs twice the best step so far is
    dropped on that forward pass (its step can only cost more), without paying for its backward pass."""
    probe: dict[str, float] = {}
    bounded: set[str] = set()
    for c in sorted(candidates, key=lambda c: c.precision != "fp32"):
        if probe:
            clock.forward(c, small)  # warm-up
            seconds = clock.forward(c, small)
            if seconds > 2 * min(probe.values()):
                probe[c.label] = seconds
                bounded.add(c.label)
                continue
        clock.step(c, small)  # warm-up: first calls pick kernels and allocate
        probe[c.label] = clock.step(c, small)
    best = min(t for label, t in probe.items() if label not in bounded)
    for c in candidates:  # a second look only where the first can be noise: emulated bf16 is 10-20x off
        if c.label not in bounded and probe[c.label] <= 3 * best:
            probe[c.label] = min(probe[c.label], clock.step(c, small))
    return probe, bounded


def _median_steps(clock: _CandidateClock, active, rounds_at_most: int) -> dict[str, float]:
    """Median seconds per full-size step of each active candidate, the candidates taking turns."""
    samples = {c.label: [] for c in active}
    for c in active:
        clock.step(c)  # warm-up at full size
    started = time.perf_counter()
    while True:
        for c in active:
            samples[c.label].append(clock.step(c))
        rounds = len(samples[active[0].label])
        if rounds >= rounds_at_most or (rounds >= 2 and time.perf_counter() - started > CALIBRATION_BUDGET_S):
            break
    return {label: statistics.median(times) for label, times in samples.items()}


CONTENTION_MIN_STEP_S = 0.03
CONTENTION_RATIO = 0.85  # one thread must beat all of them by this much: a clear loss, not timing noise
_contention_threads: int | None = None  # set once a calibration measured contention (thread_count)


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _measure_contention(model, device, chosen, batch, sample_shape, workload, seconds_n_threads) -> dict | None:
    """Time the chosen candidate on one thread against all of them. One thread clearly faster means another
    program holds a core (torch's OpenMP threads wait for each other after every op): the calibration is then
    provisional, and, unless OMP_NUM_THREADS says otherwise, this process goes on with one thread (printed).
    None below a few tens of ms per step, where one thread can beat two on an idle machine (a 9 ms toy-model
    step ran in 5 ms on one): no sign of another program there."""
    global _contention_threads
    if seconds_n_threads < CONTENTION_MIN_STEP_S:
        return None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = _time_candidates(model, device, [chosen], batch, sample_shape, workload,
                               rounds_at_most=1)[chosen.label]
    finally:
        torch.set_num_threads(threads)
    contended = one < CONTENTION_RATIO * seconds_n_threads
    if contended and not os.environ.get("OMP_NUM_THREADS", "").strip().isdigit() and _contention_threads is None:
        _contention_threads = 1
        torch.set_num_threads(1)
        print(f"contention: {threads} threads took {seconds_n_threads * 1000:.0f} ms per step, 1 thread "
              f"{one * 1000:.0f} ms (load {_load_average()}): another program is using the cores, so this process "
              f"uses 1 thread from now on, and timings taken on {threads} threads now are not cached for later runs "
              f"(set OMP_NUM_THREADS to choose)",
              file=sys.stderr, flush=True)
    return {"threads": threads, "step_ms": round(seconds_n_threads * 1000, 2), "one_thread_ms": round(one * 1000, 2),
            "contended": contended}


_contention_probed = False


def _probe_contention_once(model, device, numerics, batch, sample_shape, workload) -> None:
    """An explicit precision skips the calibration, not the thread policy: once per process, time one step on
    all threads and on one (as a calibration does), and go on with one thread where that is clearly faster."""
    global _contention_probed
    if _contention_probed or os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        return
    _contention_probed = True
    with torch.random.fork_rng(devices=[]):
        seconds = _time_candidates(model, device, [numerics], batch, sample_shape, workload,
                                   rounds_at_most=1)[numerics.label]
        _measure_contention(model, device, numerics, batch, sample_shape, workload, seconds)


# -------------------------------------------------------------------- evaluation
# On CPU a batch past a few hundred 28x28 images no longer fits in cache: resnet inference
# ran 2,500 img/s at 256 and 1,100 img/s at 2048 (bench/RESULTS.md). GPUs want large batches.
CPU_EVAL_BATCH = 256
# Crafting likewise: resnet PGD on 500 images ran 900-1,000 image-steps/s in one batch and 1,240-1,390 in
# batches of 256 or 128 (2-vCPU EPYC), and the one batch's activations for the backward pass added about
# 300 MB to the quick study's peak memory. The batch changes which convolution kernels run, so iterative
# attacks can round differently: PGD moved 0.02% of its pixels between batches of 500 and 256 (FGSM none).
CPU_CRAFT_BATCH = 256


def to_float(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [0, 1], on whatever device the tensor is."""
    return images_uint8.float().div_(255.0)


@torch.inference_mode()
def predict(model: torch.nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 2048,
            numerics: Numerics = FP32) -> torch.Tensor:
    """Argmax predictions (int64, on CPU) for uint8 or float [0, 1] images, in large batches
    (at most CPU_EVAL_BATCH on CPU, where larger ones are slower), computed as ``numerics`` says."""
    device = torch.device(device)
    if device.type == "cpu":
        batch_size = min(batch_size, CPU_EVAL_BATCH)
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(device, non_blocking=True)
        if batch.dtype == torch.uint8:
            batch = to_float(batch)
        with numerics.autocast(device):
            out.append(model(batch.contiguous(memory_format=numerics.memory_format)).argmax(dim=1))
    model.train(was_training)
    return torch.cat(out).cpu() if out else torch.empty(0, dtype=torch.long)


def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
             batch_size: int = 2048, numerics: Numerics = FP32) -> float:
    if len(labels) == 0:
        return float("nan")
    # From the count, in float64: a float32 mean turns 201/2000 into 0.10049999, which a report rounds down.
    return int((predict(model, images, device, batch_size, numerics) == labels.cpu()).sum()) / len(labels)

