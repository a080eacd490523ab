"""Every model family works with the attack code: PGD keeps its eps bound and actually moves the images."""

from __future__ import annotations

import pytest
import torch

from transferlab.attacks import craft
from transferlab.models import MODEL_FAMILIES, create_model

SMALL = {"vit": {"depth": 1, "dim": 32, "heads": 2}, "vgg": {"cfg": [8, "M", 16, "M"]}, "mlp": {"hidden": [64]},
         "lstm": {"hidden": 32}}


@pytest.mark.parametrize("family", sorted(MODEL_FAMILIES))
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_pgd_attacks_every_family_within_eps(family, channels, size):
    torch.manual_seed(0)
    model = create_model(family, num_classes=10, in_channels=channels, image_size=size, **SMALL.get(family, {}))
    model.train()  # craft must switch to eval for the attack and restore this afterwards
    images = torch.rand(16, channels, size, size)
    labels = torch.randint(0, 10, (16,))
    eps = 0.05
    adversarial = craft(model, images, labels, "pgd", eps, steps=3, seed=0)
    assert adversarial.shape == images.shape
    assert (adversarial - images).abs().max() <= eps + 1e-6
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    assert not torch.equal(adversarial, images)  # input gradients reached the pixels
    assert model.training and all(p.requires_grad for p in model.parameters())
