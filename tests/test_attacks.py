"""Tests for transferlab.attacks on tiny models trained on synthetic data (CPU, seconds)."""

import pytest
import torch
from torch import nn

from transferlab.attacks import (
    ATTACKS,
    LABEL_POLICIES,
    AttackBoundError,
    attack_params,
    check_eps_ball,
    choose_label_policy,
    craft,
    list_attacks,
    parse_attack_options,
    parse_eps,
    parse_eps_list,
    resolve_attack,
)
from transferlab import attacks as attacks_module
from transferlab.device import predict
from transferlab.errors import UserError



def synthetic_digits(n=600, seed=0):
    """Ten classes, each a fixed random 28x28 prototype plus noise: easily separable."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.rand(10, 1, 28, 28, generator=g)
    labels = torch.arange(n) % 10
    noise = 0.15 * torch.randn(n, 1, 28, 28, generator=g)
    return (prototypes[labels] + noise).clamp(0, 1), labels


def train(model, images, labels, steps=60, lr=0.05):
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        opt.step()
    return model


def accuracy(model, images, labels):
    model.eval()
    with torch.no_grad():
        return (model(images).argmax(1) == labels).float().mean().item()


class RowLSTM(nn.Module):
    """Reads a 28x28 image row by row, like the coursework's LSTM family."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(28, 16, batch_first=True)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        out, _ = self.lstm(x[:, 0])  # [N, 28 rows, 28 values]
        return self.head(out[:, -1])


class TinyConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(4 * 14 * 14, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc(self.drop(x.flatten(1)))


@pytest.fixture(scope="module")
def data():
    return synthetic_digits()


@pytest.fixture(scope="module")
def linear(data):
    torch.manual_seed(0)
    return train(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), *data, steps=20)


@pytest.fixture(scope="module")
def conv(data):
    torch.manual_seed(0)
    return train(TinyConv(), data[0][:200], data[1][:200], steps=15, lr=0.01)


# ---------------------------------------------------------------- crafting

def test_eps_zero_returns_clean_images_exactly(linear, data):
    images, labels = data
    adv = craft(linear, images, labels, "pgd", 0.0)
    assert torch.equal(adv, images) and adv is not images
    assert accuracy(linear, adv, labels) == accuracy(linear, images, labels)


ALL_ATTACKS = list_attacks() + ["torchattacks:APGD", "torchattacks:BIM"]


@pytest.mark.parametrize("attack", ALL_ATTACKS)
def test_eps_bound_holds_for_every_attack(conv, data, attack):
    images, labels = data[0][:64], data[1][:64]
    extra = {"steps": 3} if attack != "fgsm" else {}
    adv = craft(conv, images, labels, attack, 0.1, **extra)
    assert adv.shape == images.shape and adv.dtype == images.dtype and adv.device == images.device
    assert (adv - images).abs().max().item() <= 0.1 + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    assert not torch.equal(adv, images)  # the attack did move the images
    check_eps_ball(images, adv, 0.1)


def test_white_box_pgd_cuts_accuracy(linear, data):
    images, labels = data
    clean = accuracy(linear, images, labels)
    assert clean > 0.9
    adv = craft(linear, images, labels, "pgd", 0.3)
    assert accuracy(linear, adv, labels) < clean / 2


def test_seeded_pgd_is_reproducible(conv, data):
    images, labels = data[0][:64], data[1][:64]
    a = craft(conv, images, labels, "pgd", 0.1, steps=2, seed=7)
    b = craft(conv, images, labels, "pgd", 0.1, steps=2, seed=7)
    c = craft(conv, images, labels, "pgd", 0.1, steps=2, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # the random start really depends on the seed


def test_on_a_cpu_crafting_runs_at_most_cpu_craft_batch_images_at_once(conv, data, monkeypatch):
    # Memory and speed: one 500-image backward pass added 300 MB to the quick study's peak.
    monkeypatch.setattr(attacks_module, "CPU_CRAFT_BATCH", 128)
    seen = []
    hook = conv.register_forward_hook(lambda _m, inputs, _out: seen.append(len(inputs[0])))
    try:
        craft(conv, data[0][:300], data[1][:300], "pgd", 0.1, steps=2, batch_size=1000)
    finally:
        hook.remove()
    assert max(seen) == 128 and sum(seen) == 2 * 300


def test_the_batching_changes_the_images_at_most_by_rounding(conv, data):
    # The batch picks the convolution kernels, whose rounding can flip the sign of a near-zero gradient:
    # rare pixels in iterative attacks, never the bulk; a one-step attack is the same.
    images, labels = data[0][:300], data[1][:300]
    assert torch.equal(craft(conv, images, labels, "fgsm", 0.1, batch_size=256),
                       craft(conv, images, labels, "fgsm", 0.1, batch_size=40))
    whole = craft(conv, images, labels, "pgd", 0.1, steps=3, seed=3, batch_size=256)
    split = craft(conv, images, labels, "pgd", 0.1, steps=3, seed=3, batch_size=40)
    assert (whole != split).float().mean() < 1e-2  # a broken batching (slices, seeds) moves most of them


def test_batching_gives_valid_output(conv, data):
    images, labels = data[0][:50], data[1][:50]
    adv = craft(conv, images, labels, "mifgsm", 0.1, steps=2, batch_size=16)
    check_eps_ball(images, adv, 0.1)
    assert not torch.equal(adv[-2:], images[-2:])  # the short last batch was attacked too


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_craft_keeps_the_image_dtype(linear, data, dtype):
    images, labels = data[0][:16].to(dtype), data[1][:16]
    adv = craft(linear, images, labels, "pgd", 8 / 255, steps=2)
    assert adv.dtype == dtype and not torch.equal(adv, images)


def test_class_count_is_checked_for_torchattacks_classes(conv, data):
    with pytest.raises(UserError, match="n_classes=10"):
        craft(conv, data[0][:4], data[1][:4], "torchattacks:APGDT", 0.1, n_classes=47)


def test_craft_restores_modes_and_requires_grad(conv, data):
    images, labels = data[0][:16], data[1][:16]
    conv.train()
    conv.bn.eval()  # a mixed state, as after fine-tuning with frozen BatchNorm
    conv.conv.weight.requires_grad_(False)  # a frozen layer
    before_modes = [m.training for m in conv.modules()]
    before_grads = [p.requires_grad for p in conv.parameters()]
    craft(conv, images, labels, "pgd", 0.1, steps=1)
    assert [m.training for m in conv.modules()] == before_modes
    assert [p.requires_grad for p in conv.parameters()] == before_grads
    conv.conv.weight.requires_grad_(True)
    conv.eval()


def test_params_are_frozen_during_the_attack(data):
    seen = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(784, 10)

        def forward(self, x):
            seen.append((self.training, self.fc.weight.requires_grad))
            return self.fc(x.flatten(1))

    model = Spy().train()
    craft(model, data[0][:8], data[1][:8], "pgd", 0.1, steps=1)
    assert seen and all(state == (False, False) for state in seen)
    assert model.training and model.fc.weight.requires_grad


def test_lstm_row_reader_can_be_attacked(data):
    images, labels = data[0][:64], data[1][:64]
    torch.manual_seed(0)
    model = train(RowLSTM(), images, labels, steps=25, lr=0.02)
    adv = craft(model, images, labels, "pgd", 0.1, steps=3)
    check_eps_ball(images, adv, 0.1)
    assert not torch.equal(adv, images)  # input gradients flowed through the LSTM in eval mode
    assert model.training  # train() left it in train mode; craft put that back
    model.eval()
    with torch.no_grad():
        clean_loss = nn.functional.cross_entropy(model(images), labels)
        adv_loss = nn.functional.cross_entropy(model(adv), labels)
    assert adv_loss > clean_loss


def test_check_eps_ball_raises_on_breach():
    clean = torch.full((2, 1, 4, 4), 0.5)
    check_eps_ball(clean, clean + 0.1, 0.1)
    with pytest.raises(AttackBoundError, match="0.2"):
        check_eps_ball(clean, clean + 0.2, 0.1)
    with pytest.raises(AttackBoundError):
        check_eps_ball(clean, torch.full_like(clean, 1.05), 1.0)  # outside [0, 1]
    with pytest.raises(AttackBoundError):
        check_eps_ball(clean, torch.full_like(clean, float("nan")), 0.1)
    assert issubclass(AttackBoundError, RuntimeError)


def test_craft_rejects_out_of_range_pixels(linear):
    with pytest.raises(ValueError):
        craft(linear, torch.full((2, 1, 28, 28), 255.0), torch.zeros(2, dtype=torch.long), "fgsm", 0.1)


# ---------------------------------------------------------------- labels

def test_label_policy_auto():
    assert choose_label_policy("auto", "kmnist", "kmnist", "digits", "mnist") == "pred"
    assert choose_label_policy("auto", "digits", "mnist-sample", "digits", "mnist") == "true"
    assert choose_label_policy("auto", "digits", "usps", "digits", "mnist") == "true"
    assert choose_label_policy("auto", "fashion", "fmnist", "fashion", "fmnist") == "true"
    assert choose_label_policy("pred", "digits", "usps", "digits", "mnist") == "pred"
    assert choose_label_policy("TRUE", "digits", "usps", "digits", "mnist") == "true"
    assert LABEL_POLICIES == ("auto", "true", "pred")


def test_label_policy_true_with_mismatched_spaces_is_a_user_error():
    with pytest.raises(UserError, match="--labels pred"):
        choose_label_policy("true", "kmnist", "kmnist", "digits", "mnist")
    with pytest.raises(UserError, match="did you mean"):
        choose_label_policy("preds", "digits", "mnist", "digits", "mnist")


def test_pred_labels_are_the_batched_argmax(linear, data):
    # --labels pred attacks away from the model's own prediction, which the matrix takes from device.predict.
    images = data[0][:40]
    pred = predict(linear, images, torch.device("cpu"), batch_size=16)
    with torch.no_grad():
        assert torch.equal(pred, linear(images).argmax(1))


# ---------------------------------------------------------------- parsing and params

def test_parse_eps():
    assert parse_eps("8/255") == 8 / 255
    assert parse_eps("0.3") == 0.3
    assert parse_eps(0.3) == 0.3 and parse_eps(0) == 0.0 and parse_eps("1") == 1.0
    for bad in ("-0.1", -0.1, "1.5", 1.5, "abc", "1/0", "nan", ""):
        with pytest.raises(UserError):
            parse_eps(bad)
    assert parse_eps_list("0.1, 0.2,8/255") == [0.1, 0.2, 8 / 255]
    assert parse_eps_list("0.1,0.1") == [0.1]
    with pytest.raises(UserError):
        parse_eps_list(" , ")


def test_resolve_attack():
    assert resolve_attack("PGD") == "pgd"
    assert resolve_attack("torchattacks:MIFGSM") == "mifgsm"  # our name for the same class
    assert resolve_attack("torchattacks:apgd") == "torchattacks:APGD"
    with pytest.raises(UserError) as info:
        resolve_attack("pgdd")
    message = str(info.value)
    assert all(name in message for name in ATTACKS) and "did you mean pgd" in message
    with pytest.raises(UserError, match="torchattacks:APGD"):
        resolve_attack("apgd")
    with pytest.raises(UserError, match="no eps bound"):
        resolve_attack("torchattacks:CW")
    with pytest.raises(UserError, match="pgd with the attack option norm=L2"):
        resolve_attack("torchattacks:PGDL2")
    with pytest.raises(UserError, match="no attack class"):
        resolve_attack("torchattacks:Nope")


def test_parse_attack_options_types():
    options = parse_attack_options(["loss=ce", "steps=20", "decay=1.0", "norm=Linf",
                                    "random_start=false", "alpha=2/255", "seed=None"])
    assert options == {"loss": "ce", "steps": 20, "decay": 1.0, "norm": "Linf",
                       "random_start": False, "alpha": 2 / 255, "seed": None}
    assert type(options["steps"]) is int and type(options["decay"]) is float
    for bad in (["steps"], ["=3"], ["steps=1", "steps=2"]):
        with pytest.raises(UserError):
            parse_attack_options(bad)


def test_attack_params_defaults():
    pgd = attack_params("pgd", 0.3)
    assert pgd["steps"] == 10 and pgd["random_start"] is True
    assert pgd["alpha"] == pytest.approx(2.5 * 0.3 / 10)
    assert "eps" not in pgd
    assert attack_params("pgd", 0.3, steps=20, alpha=0.01)["alpha"] == 0.01
    mi = attack_params("mifgsm", 0.2, steps=5)
    assert mi["alpha"] == pytest.approx(0.2 / 5) and mi["decay"] == 1.0
    assert attack_params("tifgsm", 0.1)["len_kernel"] == 5
    assert attack_params("vmifgsm", 0.1)["N"] == 5
    assert attack_params("fgsm", 0.1) == {}
    assert attack_params("fgsm", 0.1, steps=20, alpha=0.01) == {}  # one --steps for "fgsm,pgd"
    apgd = attack_params("torchattacks:APGD", 0.1, steps=3, loss="dlr")
    assert apgd["steps"] == 3 and apgd["loss"] == "dlr" and apgd["norm"] == "Linf"
    # resolving a resolved dict again changes nothing (craft relies on it)
    assert attack_params("pgd", 0.3, **pgd) == pgd
    assert attack_params("pgd", 0.0, **attack_params("pgd", 0.0)) == attack_params("pgd", 0.0)


def test_attack_params_errors():
    for kwargs in ({"steps": 0}, {"steps": -2}, {"steps": 2.5}):
        with pytest.raises(UserError, match="steps"):
            attack_params("pgd", 0.1, **kwargs)
    with pytest.raises(UserError, match="steps"):
        attack_params("fgsm", 0.1, steps=0)  # validated even where unused
    with pytest.raises(UserError, match="'decay'.*random_start"):
        attack_params("pgd", 0.1, decay=1.0)
    with pytest.raises(UserError, match="--eps"):
        parse_attack_options(["eps=0.2"])


# ---------------------------------------------------------------- L2

L2_ATTACKS = ["fgsm", "pgd", "torchattacks:APGD"]


@pytest.mark.parametrize("attack", L2_ATTACKS)
def test_l2_attacks_stay_inside_the_l2_ball_and_the_box(conv, data, attack):
    images, labels = data[0][:64], data[1][:64]
    extra = {"steps": 3} if attack != "fgsm" else {}
    adv = craft(conv, images, labels, attack, 1.5, norm="L2", **extra)
    lengths = (adv - images).flatten(1).norm(p=2, dim=1)
    assert lengths.max().item() <= 1.5 * (1 + 1e-5) and adv.min() >= 0 and adv.max() <= 1
    # the attack moved the images (APGD leaves those the model already gets wrong as they are)
    assert (lengths > 0.1).float().mean() > 0.5
    check_eps_ball(images, adv, 1.5, norm="L2")
    with pytest.raises(AttackBoundError, match="L2 eps ball"):
        check_eps_ball(images, adv, 0.5, norm="L2")


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_l2_attacks_lower_a_trained_models_accuracy(linear, data, attack):
    images, labels = data
    clean = accuracy(linear, images, labels)
    adv = craft(linear, images, labels, attack, 2.0, norm="L2")
    assert accuracy(linear, adv, labels) < clean - 0.2


def test_fgsm_l2_is_one_step_of_eps_along_the_normalised_gradient(linear, data):
    images, labels = data[0][:32], data[1][:32]
    x = images.clone().requires_grad_(True)
    linear.eval()
    grad, = torch.autograd.grad(nn.functional.cross_entropy(linear(x), labels), x)
    step = grad / (grad.flatten(1).norm(p=2, dim=1).view(-1, 1, 1, 1) + 1e-10)
    expected = (images + 1.0 * step).clamp(0, 1)
    assert torch.allclose(craft(linear, images, labels, "fgsm", 1.0, norm="L2"), expected, atol=1e-6)


def test_pgd_l2_at_torchattacks_defaults_is_torchattacks_pgdl2(conv, data):
    """torchattacks' PGDL2 is the reference: at its defaults (eps 1, alpha 0.2, 10 steps, random start) our
    pgd under norm=L2 crafts the very same images."""
    import torchattacks

    images, labels = data[0][:48], data[1][:48]
    assert attack_params("pgd", 1.0, norm="L2")["alpha"] == pytest.approx(0.2)
    ours = craft(conv, images, labels, "pgd", 1.0, norm="L2", seed=3)
    conv.eval()
    torch.manual_seed(3)
    theirs = torchattacks.PGDL2(conv, eps=1.0, alpha=0.2, steps=10, random_start=True)(images, labels)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_l2_params_are_recorded_and_linf_params_are_as_before():
    pgd = attack_params("pgd", 3.0, norm="l2", steps=5)
    assert pgd == {"alpha": pytest.approx(2 * 3.0 / 5), "steps": 5, "random_start": True,
                   "eps_for_division": 1e-10, "norm": "L2"}
    assert attack_params("pgd", 3.0, **pgd) == pgd  # resolving again changes nothing
    # fgsm under L2 ignores --steps and --alpha as it does under Linf
    assert attack_params("fgsm", 3.0, norm="L2", steps=20, alpha=0.1) == {"eps_for_division": 1e-10, "norm": "L2"}
    # The default norm is never written down: an Linf attack's parameters (and so its set's key) are unchanged.
    assert "norm" not in attack_params("pgd", 0.1) and attack_params("fgsm", 0.1, norm="Linf") == {}
    assert attack_params("mifgsm", 0.1, norm="LINF") == attack_params("mifgsm", 0.1)
    assert attack_params("torchattacks:APGD", 2.0, norm="L2", steps=3)["norm"] == "L2"
    assert attacks_module.attack_label("pgd", pgd) == "pgd-L2"
    assert attacks_module.attack_label("pgd", attack_params("pgd", 0.1)) == "pgd"


def test_bad_norms_are_one_line_errors():
    from transferlab.errors import UserValueError

    for attack in ("mifgsm", "difgsm", "tifgsm", "torchattacks:BIM"):
        with pytest.raises(UserValueError) as info:
            attack_params(attack, 1.0, norm="L2")
        message = str(info.value)
        assert "\n" not in message and f"{attack} has no L2 form" in message
        assert "fgsm, pgd" in message and "torchattacks:APGD" in message
    with pytest.raises(UserValueError, match="unknown norm 'L3'; use Linf .* or L2"):
        attack_params("pgd", 0.1, norm="L3")
    with pytest.raises(UserError, match="norm"):
        attack_params("pgd", 0.1, norm=2)
    # an L2 radius may exceed 1; an Linf eps may not, and the error says what an eps above 1 means
    assert parse_eps("2.5", "L2") == 2.5 and parse_eps_list("1,2", "L2") == [1.0, 2.0]
    with pytest.raises(UserError, match="norm=L2"):
        parse_eps(2.5)
    with pytest.raises(UserError):
        parse_eps("-1", "L2")


def test_check_eps_ball_l2():
    clean = torch.full((2, 1, 4, 4), 0.5)
    delta = torch.zeros_like(clean)
    delta[:, 0, 0, 0] = 0.3  # one pixel: L2 and Linf length 0.3
    check_eps_ball(clean, clean + delta, 0.3, norm="L2")
    spread = torch.full_like(clean, 0.1)  # every pixel by 0.1: Linf 0.1, L2 0.4
    check_eps_ball(clean, clean + spread, 0.1)
    with pytest.raises(AttackBoundError, match="0.4"):
        check_eps_ball(clean, clean + spread, 0.3, norm="L2")
    with pytest.raises(AttackBoundError):
        check_eps_ball(clean, torch.full_like(clean, float("nan")), 0.3, norm="L2")
