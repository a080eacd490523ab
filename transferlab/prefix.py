"""The frozen prefix of a fine-tune: found in the traced graph, computed once, shared.

With its first tensors frozen (and frozen BatchNorm using its stored statistics), the front of a network is a
pure function of the image: every epoch of a fine-tune recomputes the same activations, and every model
fine-tuned from one source recomputes the same layers. This module finds where that pure part ends from the
model's torch.fx graph (not from hand-written split points, so zoo, torchvision:/timm: and users' models get it
wherever they trace), cuts the graph there into a ``prefix`` (image -> frontier activations, possibly several
tensors: a residual block hands on two) and a ``tail`` (frontier -> logits), and keeps the frontier of a
fixed set of images on the device, or in a checked memory-mapped file when it exceeds the budget.

A node is "pure" when its value depends only on the input and frozen tensors and draws no random numbers in the
mode the graph was traced in: parameters frozen, BatchNorm in eval mode, no dropout. The frontier is the pure
values a non-pure node reads. The split shares the model's modules (no copies), so training the tail trains
the model.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx as fx

from transferlab import names, store
from transferlab.config import TrainConfig, augmentation_of
from transferlab.device import CPU_EVAL_BATCH, FP32, Numerics, accuracy, device_name, to_float
from transferlab.machine import FEATURE_BUDGET_ENV, feature_budget_bytes
from transferlab.machine import feature_budget_text as budget_text  # noqa: F401 - it lived here; torch-free there

# Caching trades computing the prefix for reading its frontier from memory. Below this many prefix FLOPs per
# cached byte (fp32 multiply-adds counted by torch's FlopCounterMode), reading the activations costs about what
# recomputing them does, while the cache still costs its memory: the mixer's patch embedding alone (freeze 2)
# does 8 FLOPs per byte, the ResNet's first 23 tensors about 600.
MIN_FLOPS_PER_BYTE = 16
BUDGET_ENV = FEATURE_BUDGET_ENV
FILE_SCHEMA = 1
ENABLED = True  # bench/prefix.py and the tests switch it off to time and compare the full forward
SAMPLE_BATCH = 3  # images traced through the graph: >1 for train-mode BatchNorm, and no size a layer has

_RANDOM_OPS = {"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
               "rand", "randn", "rand_like", "randn_like", "randint", "randint_like", "randperm", "bernoulli",
               "bernoulli_", "multinomial", "normal", "normal_", "poisson", "uniform_", "exponential_", "rrelu",
               "rrelu_", "gumbel_softmax", "native_dropout"}


@dataclass
class Split:
    """A model cut at its frontier: ``prefix(images)`` -> tuple of frontier tensors, ``tail(*frontier)`` -> logits."""

    prefix: fx.GraphModule
    tail: fx.GraphModule
    shapes: list[tuple]  # per image
    dtypes: list[torch.dtype]
    flops_per_image: float

    @property
    def bytes_per_image(self) -> int:
        return sum(math.prod(s) * torch.empty((), dtype=d).element_size() for s, d in zip(self.shapes, self.dtypes))

    def describe(self) -> str:
        k = len(self.shapes)
        return f"{k} activation{'s' if k != 1 else ''}, {self.bytes_per_image / 1000:.1f} KB/img"


@dataclass
class Decision:
    """Which forward path a fine-tune takes, and why (recorded in run.json as ``frozen_prefix``)."""

    split: Split | None
    reason: str
    storage: str | None = None  # "device" or "file" once the frontier is computed
    seconds: float = 0.0  # finding the frontier and computing it for the training (and validation) images

    def record(self) -> dict:
        out = {"path": "prefix cache" if self.split else "full forward", "why": self.reason}
        if self.split is not None:
            out.update(activations=len(self.split.shapes), bytes_per_image=self.split.bytes_per_image,
                       flops_per_image=round(self.split.flops_per_image), storage=self.storage,
                       seconds=round(self.seconds, 3))
        return out


# ------------------------------------------------------------------ finding the frontier
def _target_name(node: fx.Node) -> str:
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    return name.rsplit(".", 1)[-1]


def _draws_random(node: fx.Node) -> bool:
    name = _target_name(node)
    if name in _RANDOM_OPS:
        return name not in ("dropout", "alpha_dropout", "feature_alpha_dropout") or _flag(node, "training", 2)
    if name == "scaled_dot_product_attention":
        return bool(node.kwargs.get("dropout_p", node.args[4] if len(node.args) > 4 else 0.0))
    if name in ("batch_norm", "instance_norm"):  # functional, with batch statistics: depends on the batch
        return _flag(node, "training", 5) if name == "batch_norm" else False
    return False


def _flag(node: fx.Node, key: str, position: int) -> bool:
    value = node.kwargs.get(key, node.args[position] if len(node.args) > position else True)
    return bool(value) if not isinstance(value, fx.Node) else True


def _module_is_pure(module: torch.nn.Module, frozen: set[int]) -> bool:
    if any(id(p) not in frozen for p in module.parameters()):
        return False
    if module.training and isinstance(module, (torch.nn.modules.dropout._DropoutNd, torch.nn.RReLU,
                                               torch.nn.modules.batchnorm._BatchNorm)):
        return False
    return not (module.training and isinstance(module, torch.nn.RNNBase) and module.dropout > 0)


def _pure_nodes(gm: fx.GraphModule, frozen: set[int]) -> set[fx.Node]:
    """The nodes whose values depend only on the input and frozen tensors, deterministically."""
    pure: set[fx.Node] = set()
    for node in gm.graph.nodes:
        inputs_pure = all(n in pure for n in node.all_input_nodes)
        if node.op == "placeholder":
            ok = True
        elif node.op == "get_attr":
            value = _fetch(gm, node.target)
            ok = not isinstance(value, torch.nn.Parameter) or id(value) in frozen
        elif node.op == "call_module":
            ok = inputs_pure and _module_is_pure(gm.get_submodule(node.target), frozen)
        elif node.op in ("call_function", "call_method"):
            ok = inputs_pure and not _draws_random(node)
        else:
            ok = False
        if ok:
            pure.add(node)
    return pure


def _fetch(gm: torch.nn.Module, target: str):
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _ancestors(nodes: list[fx.Node]) -> set[fx.Node]:
    seen, stack = set(), list(nodes)
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
    return seen


def _cut(gm: fx.GraphModule, pure: set[fx.Node], frontier: list[fx.Node]) -> tuple[fx.GraphModule, fx.GraphModule]:
    """The prefix graph (input -> frontier tuple) and the tail graph (frontier -> the model's output)."""
    needed = _ancestors(frontier)
    prefix_graph, env = fx.Graph(), {}
    for node in gm.graph.nodes:
        if node in needed:
            env[node] = prefix_graph.node_copy(node, lambda n: env[n])
    prefix_graph.output(tuple(env[n] for n in frontier))
    tail_graph, env = fx.Graph(), {}
    for node in frontier:
        env[node] = tail_graph.placeholder(f"frontier_{node.name}")
    for node in gm.graph.nodes:
        if node in env or node.op == "placeholder" or (node in pure and node.op != "get_attr"):
            continue
        if node.op == "get_attr" and not any(u not in pure or u.op == "output" for u in node.users):
            continue  # a frozen tensor only the prefix reads
        env[node] = tail_graph.node_copy(node, lambda n: env[n])
    return fx.GraphModule(gm, prefix_graph, "Prefix"), fx.GraphModule(gm, tail_graph, "Tail")


def _propagate(gm: fx.GraphModule, sample: torch.Tensor, numerics: Numerics, device: torch.device) -> None:
    """Shapes and dtypes of every node (ShapeProp) on a few images, leaving the model as it was: its
    buffers (BatchNorm statistics) and the random number generators."""
    from torch.fx.passes.shape_prop import ShapeProp  # lazy: import cost (0.2 s), only where something is frozen

    buffers = [(b, b.detach().clone()) for b in gm.buffers()]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad(), \
            numerics.autocast(device):
        ShapeProp(gm).propagate(sample)
    with torch.no_grad():
        for buffer, saved in buffers:
            buffer.copy_(saved)


def split_model(model: torch.nn.Module, sample: torch.Tensor, numerics: Numerics = FP32,
                frozen: set[int] | None = None) -> Split | str:
    """``model`` (in the mode it will run in) cut where its frozen, deterministic part ends, or why it cannot
    be. ``sample``: a few float images on the model's device; ``frozen``: ids of the frozen parameters (default
    those with requires_grad off)."""
    frozen = {id(p) for p in model.parameters() if not p.requires_grad} if frozen is None else frozen
    if not frozen:
        return "nothing is frozen"
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: the full forward, as before
        first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
        return f"the model does not trace with torch.fx ({type(exc).__name__}: {first})"
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return f"the model's forward takes {len(placeholders)} inputs, not one image batch"
    pure = _pure_nodes(gm, frozen)
    frontier = [n for n in gm.graph.nodes if n in pure and n.op != "get_attr"
                and any(u not in pure or u.op == "output" for u in n.users)]
    if not frontier or all(n.op == "placeholder" for n in frontier):
        return "no frozen layer computes before the first trainable one"
    try:
        _propagate(gm, sample, numerics, sample.device)
    except Exception as exc:  # noqa: BLE001 - a graph that runs eagerly but not node by node
        return f"the traced graph does not run node by node ({type(exc).__name__})"
    from torch.fx.passes.shape_prop import TensorMetadata  # lazy: import cost

    metas = [n.meta.get("tensor_meta") for n in frontier]
    if not all(isinstance(m, TensorMetadata) and len(m.shape) >= 1 and m.shape[0] == len(sample) for m in metas):
        return "the frozen part hands the tail values that are not per-image tensors"
    prefix, tail = _cut(gm, pure, frontier)
    return Split(prefix, tail, [tuple(m.shape[1:]) for m in metas], [m.dtype for m in metas],
                 _flops(prefix, sample[:1]))


def _flops(prefix: fx.GraphModule, sample: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode  # lazy: import cost (0.2 s), only where something is frozen

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        prefix(sample)
    return float(counter.get_total_flops())


def decide(model: torch.nn.Module, sample: torch.Tensor, numerics: Numerics, *, augmentation: str | None = None,
           bn_stats: str = "frozen") -> Decision:
    """Whether a fine-tune of ``model`` (already in training mode, as fit runs it) trains its tail on cached
    frontier activations, and why (or why not). ``augmentation``: what the run's augmentation does to the input
    (config.augmentation_of), or None."""
    if not ENABLED:
        return Decision(None, "full forward: the prefix cache is switched off (transferlab.prefix.ENABLED)")
    if augmentation:
        return Decision(None, f"full forward: augmentation {augmentation} the input")
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    if not frozen:
        return Decision(None, "full forward: nothing is frozen")
    if bn_stats == "update" and any(
            isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training
            and any(id(p) in frozen for p in m.parameters(recurse=False)) for m in model.modules()):
        return Decision(None, "full forward: a frozen BatchNorm updates its statistics (bn_stats=update)")
    split = split_model(model, sample, numerics, frozen)
    if isinstance(split, str):
        return Decision(None, f"full forward: {split}")
    per_byte = split.flops_per_image / max(split.bytes_per_image, 1)
    if per_byte < MIN_FLOPS_PER_BYTE:
        return Decision(None, f"full forward: the frozen part does {per_byte:.1f} FLOPs per byte of its frontier "
                              f"({split.describe()}), under {MIN_FLOPS_PER_BYTE}: reading it back costs about "
                              f"what computing it does")
    return Decision(split, f"prefix cache: {split.describe()}")


# ------------------------------------------------------------------ keeping the frontier
def budget_bytes(device: torch.device | None = None) -> int:
    """How many bytes of frontier activations stay on the device; more go to a memory-mapped file.
    $TRANSFERLAB_FEATURE_BUDGET (e.g. 2GB) or a quarter of the device's memory (machine.feature_budget_bytes)."""
    memory = None
    if device is not None and torch.device(device).type == "cuda" and not os.environ.get(BUDGET_ENV, "").strip():
        memory = torch.cuda.get_device_properties(torch.device(device)).total_memory
    return feature_budget_bytes(memory)


@dataclass
class Frontier:
    """The frontier activations of a fixed set of images, on the device or memory-mapped from a file."""

    tensors: list[torch.Tensor]
    storage: str  # "device" or "file"
    memory_format: torch.memory_format = torch.contiguous_format
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.tensors[0])

    def batch(self, index: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The activations of images ``index`` (a fresh tensor each: the tail may write into its inputs)."""
        index = index.to(self.tensors[0].device)
        return tuple(_layout(t[index].to(device, non_blocking=True), self.memory_format) for t in self.tensors)

    def chunks(self, size: int, device: torch.device):
        for start in range(0, len(self), size):
            yield tuple(_layout(t[start:start + size].to(device), self.memory_format).clone() for t in self.tensors)


def _layout(t: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    return t.contiguous(memory_format=memory_format) if t.dim() == 4 else t


def _prefix_chunks(split: Split, images_u8: torch.Tensor, device: torch.device, numerics: Numerics, chunk: int):
    with torch.no_grad(), numerics.autocast(device):
        for start in range(0, len(images_u8), chunk):
            x = to_float(images_u8[start:start + chunk].to(device)).contiguous(memory_format=numerics.memory_format)
            yield [t.detach() for t in split.prefix(x)]


def frontier_key(split: Split, images_u8: torch.Tensor, numerics: Numerics, device: torch.device, chunk: int) -> str:
    """What the frontier of these images depends on: the prefix's code and tensors (by content), the images'
    bytes, the numerics, the chunk size (it picks kernels), the device and torch."""
    state = split.prefix.state_dict()
    tensors = store.sha256_hex(part for name in sorted(state)
                               for part in (f"{name}|{state[name].dtype}|{list(state[name].shape)}|",
                                            store.tensor_bytes(state[name])))
    return store.content_key({"schema": FILE_SCHEMA, "code": split.prefix.code, "tensors": tensors,
                              "images": store.sha256_hex([store.tensor_bytes(images_u8)]),
                              "shape": list(images_u8.shape), "numerics": numerics.label, "chunk": chunk,
                              "device": device_name(device), "torch": torch.__version__}, 24)


def compute_frontier(split: Split, images_u8: torch.Tensor, device: torch.device, numerics: Numerics, *,
                     chunk: int, budget: int | None = None, cache_dir: Path | None = None) -> Frontier:
    """The frontier of ``images_u8`` (uint8 [N, C, H, W]): on ``device`` while N x bytes per image fits
    ``budget`` (default budget_bytes), else in a checked memory-mapped file under ``cache_dir``."""
    budget = budget_bytes(device) if budget is None else budget
    if len(images_u8) * split.bytes_per_image <= budget:
        parts = list(zip(*_prefix_chunks(split, images_u8, device, numerics, chunk)))
        return Frontier([torch.cat(p) for p in parts], "device", numerics.memory_format)
    from transferlab.data import default_cache_dir  # lazy: import cost (data loads pandas-free, but not needed)
    folder = Path(cache_dir or default_cache_dir()) / "frontier"
    key = frontier_key(split, images_u8, numerics, device, chunk)
    found = _read_file(folder, key, split, len(images_u8))
    if found is None:
        _write_file(folder, key, split, images_u8, device, numerics, chunk)
        found = _read_file(folder, key, split, len(images_u8))
        if found is None:
            raise OSError(f"frontier cache file {folder / key}.bin did not read back as written")
    return Frontier(found, "file", numerics.memory_format, folder / f"{key}.bin")


def _write_file(folder: Path, key: str, split: Split, images_u8, device, numerics, chunk) -> None:
    """Activations into ``KEY.bin`` (each tensor contiguous, one prefix pass) through store.atomic_file (a kill
    leaves no KEY.bin, only a temporary that the next attempt removes), then ``KEY.json`` with the sha256 of the
    bytes, written last."""
    folder.mkdir(parents=True, exist_ok=True)
    names.clean_stale_staging(folder, only_name=f"{key}.bin")  # a killed attempt at this very file
    sizes = _file_sizes(split, len(images_u8))
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    with store.atomic_file(folder / f"{key}.bin") as tmp:
        with open(tmp, "xb") as handle:
            handle.truncate(sum(sizes))
            for tensors in _prefix_chunks(split, images_u8, device, numerics, chunk):
                for i, tensor in enumerate(tensors):
                    data = store.tensor_bytes(tensor)
                    handle.seek(offsets[i])
                    handle.write(data)
                    offsets[i] += len(data)
        digest = _file_digest(tmp)
    store.atomic_write_json(folder / f"{key}.json", {
        "schema": FILE_SCHEMA, "key": key, "images": len(images_u8), "shapes": [list(s) for s in split.shapes],
        "dtypes": [str(d) for d in split.dtypes], "sha256": digest})


def _file_sizes(split: Split, n: int) -> list[int]:
    return [n * math.prod(s) * torch.empty((), dtype=d).element_size() for s, d in zip(split.shapes, split.dtypes)]


def _file_digest(path: Path) -> str:
    with open(path, "rb") as handle:
        return store.sha256_hex(iter(lambda: handle.read(1 << 24), b""))


def _read_file(folder: Path, key: str, split: Split, n: int) -> list[torch.Tensor] | None:
    """The file's tensors (memory-mapped, read-only), or None when it is missing, partial, altered or foreign."""
    bin_path, meta_path = folder / f"{key}.bin", folder / f"{key}.json"
    if not bin_path.is_file() or not meta_path.is_file():
        return None
    try:
        meta = store.read_json(meta_path, what="frontier cache file")
    except Exception:  # noqa: BLE001 - damaged: rebuild
        return None
    expected = {"schema": FILE_SCHEMA, "key": key, "images": n, "shapes": [list(s) for s in split.shapes],
                "dtypes": [str(d) for d in split.dtypes]}
    sizes = _file_sizes(split, n)
    if any(meta.get(k) != v for k, v in expected.items()) or bin_path.stat().st_size != sum(sizes):
        return None
    if _file_digest(bin_path) != meta.get("sha256"):
        return None
    flat = torch.from_file(str(bin_path), shared=False, size=sum(sizes), dtype=torch.uint8)
    tensors, offset = [], 0
    for size, shape, dtype in zip(sizes, split.shapes, split.dtypes):
        tensors.append(flat[offset:offset + size].view(dtype).view(n, *shape))
        offset += size
    return tensors


# ------------------------------------------------------------------ prediction on a frontier
@torch.inference_mode()
def predict_tail(tail: torch.nn.Module, frontier: Frontier, device: torch.device, batch_size: int,
                 numerics: Numerics) -> torch.Tensor:
    """Argmax predictions of ``tail`` on a frontier (the tail's modules in eval mode while it runs)."""
    was = [(m, m.training) for m in tail.modules()]
    tail.eval()
    out = []
    for inputs in frontier.chunks(batch_size, device):
        with numerics.autocast(device):
            out.append(tail(*inputs).argmax(dim=1))
    for module, mode in was:
        module.training = mode
    return torch.cat(out).cpu() if out else torch.empty(0, dtype=torch.long)


@dataclass
class SharedPrefix:
    """Models whose eval-mode prefixes compute the same thing (same code, same tensors by content, same
    numerics): ``predict`` runs the prefix once per batch and each model's tail on it."""

    key: str
    prefix: fx.GraphModule
    tails: dict = field(default_factory=dict)  # member id -> tail


def eval_prefix_key(split: Split, numerics: Numerics) -> str:
    state = split.prefix.state_dict()
    tensors = store.sha256_hex(part for name in sorted(state)
                               for part in (f"{name}|{state[name].dtype}|{list(state[name].shape)}|",
                                            store.tensor_bytes(state[name])))
    return store.content_key({"code": split.prefix.code, "tensors": tensors, "numerics": numerics.label})


def _mutates_inputs(tail: fx.GraphModule) -> bool:
    """Whether a tail may write into a frontier tensor it is given (an in-place op on a placeholder)."""
    for node in tail.graph.nodes:
        if any(n.op == "placeholder" for n in node.all_input_nodes):
            module = tail.get_submodule(node.target) if node.op == "call_module" else None
            if (getattr(module, "inplace", False) or node.kwargs.get("inplace")
                    or (node.op == "call_method" and str(node.target).endswith("_"))
                    or _target_name(node).startswith("i") and _target_name(node) in ("iadd", "isub", "imul", "itruediv")):
                return True
    return False


@torch.inference_mode()
def predict_shared(prefix: fx.GraphModule, tails: list[fx.GraphModule], images: torch.Tensor,
                   device: torch.device, batch_size: int, numerics: Numerics) -> list[torch.Tensor]:
    """Argmax predictions of each tail on ``images`` (uint8 or float in [0, 1]), the prefix computed once per
    batch; batches as device.predict makes them, so each equals the full model's predictions."""
    batch_size = _eval_chunk(device, batch_size)  # the batches device.predict makes
    copies = [_mutates_inputs(t) for t in tails]
    out: list[list[torch.Tensor]] = [[] for _ in tails]
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(device, non_blocking=True)
        if batch.dtype == torch.uint8:
            batch = to_float(batch)
        with numerics.autocast(device):
            frontier = prefix(batch.contiguous(memory_format=numerics.memory_format))
            for i, tail in enumerate(tails):
                inputs = tuple(t.clone() for t in frontier) if copies[i] else frontier
                out[i].append(tail(*inputs).argmax(dim=1))
    return [torch.cat(o).cpu() if o else torch.empty(0, dtype=torch.long) for o in out]


# ------------------------------------------------------------------ a fine-tune's prefix
@dataclass
class FineTunePrefix:
    """What fit needs from the frozen prefix: the decision, the training images' frontier and the tail that
    trains on it, and (where the eval-mode graph cuts at the same frontier) the validation images' frontier
    and the eval-mode tail that scores it."""

    decision: Decision
    frontier: Frontier | None = None
    eval_tail: fx.GraphModule | None = None
    val_frontier: Frontier | None = None

    @property
    def tail(self) -> fx.GraphModule | None:
        return self.decision.split.tail if self.decision.split is not None and self.frontier is not None else None

    @classmethod
    def prepare(cls, model: torch.nn.Module, train_images: torch.Tensor, val_images: torch.Tensor | None,
                numerics: Numerics, device: torch.device, config: TrainConfig) -> "FineTunePrefix":
        """``model`` in its training mode (fit's set_train_mode), on ``device`` in its memory format; ``config``
        is fit's: its augmentation and BatchNorm mode decide whether the prefix may be cached, its batch sizes
        chunk the frontier's computation."""
        started = time.perf_counter()
        sample = to_float(train_images[:SAMPLE_BATCH].to(device)).contiguous(memory_format=numerics.memory_format)
        decision = decide(model, sample, numerics, augmentation=augmentation_of(config), bn_stats=config.bn_stats)
        if decision.split is None:
            return cls(decision)
        frontier = compute_frontier(decision.split, train_images, device, numerics, chunk=config.batch_size)
        decision.storage = frontier.storage
        decision.reason += " (memory-mapped file)" if frontier.storage == "file" else ""
        found = cls(decision, frontier)
        found._prepare_evaluation(model, sample, val_images, numerics, device, config.eval_batch_size)
        decision.seconds = time.perf_counter() - started
        return found

    def _prepare_evaluation(self, model, sample, val_images, numerics, device, eval_batch) -> None:
        """The eval-mode tail, where the eval-mode graph cuts at the same frontier (the frozen prefix computes the
        same in both modes: that is what made it cacheable), and the validation images' frontier."""
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            split = split_model(model, sample, numerics)
        finally:
            for module, mode in modes:
                module.training = mode
        if isinstance(split, Split) and split.prefix.code == self.decision.split.prefix.code:
            self.eval_tail = split.tail
            if val_images is not None and len(val_images):
                self.val_frontier = compute_frontier(self.decision.split, val_images, device, numerics,
                                                     chunk=_eval_chunk(device, eval_batch))

    def val_accuracy(self, model, val_images, val_labels, device, eval_batch, numerics) -> float:
        if self.val_frontier is None:
            return accuracy(model, val_images, val_labels, device, eval_batch, numerics)
        predicted = predict_tail(self.eval_tail, self.val_frontier, device, _eval_chunk(device, eval_batch), numerics)
        return int((predicted == val_labels.cpu()).sum()) / len(val_labels)

    def fit_images_accuracy(self, train_labels, val_labels, device, eval_batch, numerics) -> float | None:
        """Eval-mode accuracy on every image fit was given (training and held-out), from their frontiers through
        the eval-mode tail: the frozen layers are not run again on them. None where the full model must run."""
        frontiers = [(self.frontier, train_labels)] + ([(self.val_frontier, val_labels)] if val_labels is not None else [])
        if self.eval_tail is None or any(frontier is None for frontier, _ in frontiers):
            return None
        chunk = _eval_chunk(device, eval_batch)
        correct = sum(int((predict_tail(self.eval_tail, frontier, device, chunk, numerics) == labels.cpu()).sum())
                      for frontier, labels in frontiers)
        return correct / sum(len(labels) for _, labels in frontiers)


def _eval_chunk(device: torch.device, batch_size: int) -> int:
    return min(batch_size, CPU_EVAL_BATCH) if torch.device(device).type == "cpu" else batch_size
