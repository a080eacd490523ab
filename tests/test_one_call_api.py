"""One-call crafting and scoring for library users (issue 24): transferlab.craft and transferlab.evaluate, the
same crafting and scoring the attack matrix runs, on what load_dataset returns."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import transferlab
from transferlab import attacks


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    images, labels = transferlab.load_dataset("mnist-sample", "train")
    x = images.float() / 255
    optimizer = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(60):
        batch = torch.randint(0, len(x), (128,))
        loss = nn.functional.cross_entropy(net(x[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()


def test_craft_and_evaluate_in_one_call_each(trained):
    images, labels = transferlab.load_dataset("mnist-sample", "test")
    images, labels = images[:200], labels[:200]
    adversarial = transferlab.craft(trained, images, labels, attack="pgd", eps=0.1, steps=3)
    clean = images.float() / 255
    assert adversarial.shape == clean.shape and adversarial.dtype == torch.float32
    assert (adversarial - clean).abs().max() <= 0.1 + 1e-6 and adversarial.min() >= 0 and adversarial.max() <= 1
    # The attack matrix's crafting, exactly.
    assert torch.equal(adversarial, attacks.craft(trained, clean, labels, "pgd", 0.1, steps=3))

    result = transferlab.evaluate(trained, adversarial, labels, clean=images)
    with torch.no_grad():
        expected = (trained(adversarial).argmax(1) == labels)
        clean_ok = (trained(clean).argmax(1) == labels)
    assert torch.equal(result.correct, expected)
    assert result.accuracy == pytest.approx(expected.double().mean().item())
    assert result.clean_accuracy == pytest.approx(clean_ok.double().mean().item()) and result.clean_accuracy > 0.6
    assert result.accuracy < result.clean_accuracy
    assert result.attack_success_rate == pytest.approx((clean_ok & ~expected).sum().item() / clean_ok.sum().item())
    # An (images, labels) pair works as the set; NumPy input (as_numpy=True) too.
    assert transferlab.evaluate(trained, (adversarial, labels)).accuracy == result.accuracy
    arrays = transferlab.load_dataset("mnist-sample", "test", as_numpy=True)
    again = transferlab.craft(trained, arrays[0][:200], arrays[1][:200], attack="pgd", eps=0.1, steps=3)
    assert torch.equal(again, adversarial)


def test_evaluate_without_labels_says_how_to_call_it(trained):
    with pytest.raises(TypeError, match="evaluate needs labels"):
        transferlab.evaluate(trained, torch.zeros(2, 1, 28, 28))


def test_a_targeted_attack_moves_images_towards_the_classes_asked_for(trained):
    images, labels = transferlab.load_dataset("mnist-sample", "test")
    images, labels = images[:100], labels[:100]
    wanted = (labels + 1) % 10
    kwargs = dict(attack="pgd", eps=0.3, steps=10)
    towards = transferlab.evaluate(trained, transferlab.craft(trained, images, labels, target_labels=wanted, **kwargs),
                                   wanted)
    away = transferlab.evaluate(trained, transferlab.craft(trained, images, labels, **kwargs), wanted)
    assert towards.accuracy > 0.5 and towards.accuracy > away.accuracy + 0.2  # accuracy here: hitting the target
    with pytest.raises(transferlab.UserError, match="no targeted mode"):
        transferlab.craft(trained, images[:4], labels[:4], attack="torchattacks:TPGD", eps=0.1, target_labels=wanted[:4])
