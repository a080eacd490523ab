"""Datasets as uint8 tensors on one canvas.

Every dataset, whatever its source format, becomes a ``Dataset``: a train and a test
``Split`` of uint8 images ``[N, C, H, W]`` and int64 labels, all on one canvas (by
default 1x28x28), plus a provenance record for the run's JSON.

One job per module:
  * ``registry``: dataset names, aliases and specs, and where each one's files come from;
  * ``canvas``: the canvases (gray28, rgb32), conversion onto them, per-channel statistics;
  * ``loaders``: ``load`` and ``get_spec``, reading through torchvision, npz folders or the shipped samples;
  * ``cache``: the canvas-tensor cache that makes the second load of a dataset cheap;
  * ``sampling``: stratified subsets;
  * ``dataset``: the ``DatasetSpec``, ``Split`` and ``Dataset`` records they pass around.

Everything other modules use is importable from ``transferlab.data`` itself.
"""

import importlib

# Names load their module on first use (PEP 562), so `transferlab datasets` and `transferlab --help` list the
# registry without importing torch (data.registry and data.spec are torch-free; the loaders are not).
_MODULE_OF = {
    "CACHE_FORMAT_VERSION": "cache",
    **dict.fromkeys(("CANVASES", "DEFAULT_CANVAS", "LUMA_WEIGHTS", "Canvas", "channel_stats", "get_canvas",
                     "to_canvas"), "canvas"),
    **dict.fromkeys(("SPLITS", "Dataset", "Split"), "dataset"),
    "DatasetSpec": "spec",
    **dict.fromkeys(("MAX_NPZ_CLASSES", "SAMPLE_FORMAT", "get_spec", "load", "read_sample_file"), "loaders"),
    **dict.fromkeys(("NPZ_PREFIX", "SAMPLE_TEST_COUNT", "SAMPLE_TRAIN_COUNT", "SAMPLES_DIR", "TorchvisionSource",
                     "default_cache_dir", "default_data_dir", "list_datasets", "resolve_name"), "registry"),
    "stratified_subset": "sampling",
}
__all__ = [
    "CACHE_FORMAT_VERSION", "CANVASES", "DEFAULT_CANVAS", "LUMA_WEIGHTS", "MAX_NPZ_CLASSES", "NPZ_PREFIX",
    "SAMPLES_DIR", "SAMPLE_FORMAT", "SAMPLE_TEST_COUNT", "SAMPLE_TRAIN_COUNT", "SPLITS", "Canvas", "Dataset",
    "DatasetSpec", "Split", "TorchvisionSource", "channel_stats", "default_cache_dir", "default_data_dir",
    "get_canvas", "get_spec", "list_datasets", "load", "read_sample_file", "resolve_name", "stratified_subset",
    "to_canvas",
]


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'transferlab.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"transferlab.data.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
