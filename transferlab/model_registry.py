"""The model registry, the bottom of the model layers (timm's ``_registry`` pattern).

The zoo (``models.py``) adds each family here with ``@register``; ``model_sources.py`` adds the kinds of
names it builds from outside the zoo (``module:factory``, ``torchvision:``/``timm:NAME``, entry points) with
``register_source``. ``models.create_model`` then only looks a name up here, so the zoo and the outside
sources never call each other. ``Normalize`` lives here because both put it first in every network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from transferlab.errors import UserError

# ----------------------------------------------------------------------------- the zoo's families


@dataclass(frozen=True)
class ModelFamily:
    name: str
    description: str
    defaults: dict  # every option the family takes, with its default value
    block_help: str  # the block names freeze_count_for accepts, at the defaults


MODEL_FAMILIES: dict[str, ModelFamily] = {}
FAMILY_CLASSES: dict[str, type] = {}  # family name -> its nn.Module class


def register(name: str, description: str, defaults: dict, block_help: str):
    """Class decorator: add a family to the zoo, so its defaults sit next to its code."""

    def add(cls):
        cls.family = name
        MODEL_FAMILIES[name] = ModelFamily(name, description, defaults, block_help)
        FAMILY_CLASSES[name] = cls
        return cls

    return add


def list_models() -> list[ModelFamily]:
    return list(MODEL_FAMILIES.values())


# ----------------------------------------------------------------------------- sources outside the zoo


@dataclass(frozen=True)
class ExternalSource:
    claims: Callable[[str], bool]  # whether a model name is one this source builds
    build: Callable[..., nn.Module]  # (name, num_classes, in_channels, image_size, mean=, std=, **options)


_SOURCES: list[ExternalSource] = []


def register_source(claims: Callable[[str], bool], build: Callable[..., nn.Module]) -> None:
    _SOURCES.append(ExternalSource(claims, build))


def external_source(name: str) -> ExternalSource | None:
    """The registered source that builds ``name``, or None (an unknown name)."""
    return next((source for source in _SOURCES if source.claims(name)), None)


# ----------------------------------------------------------------------------- the first layer of every model


class Normalize(nn.Module):
    """(x - mean) / std per channel. Buffers, so they travel in the state dict with the
    weights (a checkpoint remembers its training data's statistics) but are never trained."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("mean", torch.full((1, channels, 1, 1), 0.5))
        self.register_buffer("std", torch.full((1, channels, 1, 1), 0.5))

    def set_stats(self, mean=None, std=None) -> None:
        channels = self.mean.shape[1]
        for name, values in (("mean", mean), ("std", std)):
            if values is None:
                continue
            try:
                t = torch.as_tensor(values, dtype=torch.float32).flatten()
            except (TypeError, ValueError, RuntimeError):
                raise UserError(f"{name} must be numbers, got {values!r}") from None
            if t.numel() == 1:  # one value for every channel
                t = t.expand(channels)
            if t.numel() != channels:
                raise UserError(f"{name} has {t.numel()} values but the model takes {channels} channels")
            if not torch.isfinite(t).all() or (name == "std" and (t <= 0).any()):
                raise UserError(f"{name} {t.tolist()} is not usable (finite values, std > 0)")
            getattr(self, name).copy_(t.view(1, channels, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std
