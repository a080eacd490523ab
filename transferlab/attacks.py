"""Adversarial attacks behind one call shape, and the label policy for attacking.

Every attack comes from torchattacks and works in [0, 1] pixel space: our models
normalise inside their first layer, so torchattacks needs no normalisation set.

``craft(model, images, labels, attack, eps)`` is the one call the rest of the
project uses. It resolves the attack's parameters with ``attack_params`` (the same
dict that is recorded next to the results), runs the attack in batches with the
model frozen and in eval mode, seeds every random choice, and checks afterwards
that no adversarial image left the eps ball (of its norm) or [0, 1].

Norms: every attack bounds the L-infinity distance (no pixel moves by more than
eps) unless it is given ``norm="L2"`` (``--attack-opt norm=L2``; in a study
``norm = "L2"``), which bounds each image's L2 distance instead. fgsm and pgd have
an L2 form: for fgsm the fast gradient method (one step of length eps along the
gradient divided by its per-image L2 norm), for pgd torchattacks' PGDL2 (normalised
gradient steps, projection onto the L2 ball, then [0, 1]). A ``torchattacks:<Class>``
that takes a norm itself (APGD, APGDT, FAB, Square, AutoAttack) is given it. An L2 eps
is a length, not a pixel value, so it may exceed 1. The default norm is never
written into an attack's parameters, so an L-infinity set keeps the key it had
before norms existed; an L2 set's parameters say ``norm: L2``.

Defaults (on top of torchattacks' own, which were tuned for eps = 8/255 on
CIFAR/ImageNet and so do not scale with eps):

* ``pgd``: steps 10, random_start True, alpha = 2.5 * eps / steps (the Madry et
  al. rule; at eps = 8/255 and 10 steps it equals torchattacks' 2/255). Under L2,
  alpha = 2 * eps / steps: torchattacks' PGDL2 default (alpha 0.2 at its eps 1.0
  and 10 steps), scaled with eps like the L-infinity rule; its random start (a
  uniformly drawn radius along a random direction) is PGDL2's own.
* ``mifgsm``, ``nifgsm``, ``vmifgsm``, ``difgsm``, ``tifgsm`` (transfer attacks):
  steps 10, alpha = eps / steps, as in the MI-FGSM paper, so the T steps exactly
  span the ball. Everything else keeps torchattacks' default (decay 1.0 for the
  momentum attacks, decay 0.0 for difgsm/tifgsm, resize_rate 0.9,
  diversity_prob 0.5, N 5, beta 1.5) except ``tifgsm``'s translation kernel:
  len_kernel 5 instead of 15, since 15 was chosen for 299-pixel ImageNet images
  and would blur a 28-pixel digit's gradient away.
* ``torchattacks:<Class>``: the class's own defaults, except that alpha, where
  the class has both alpha and steps, is 2.5 * eps / steps like pgd, and a
  ``seed`` argument that defaults to None (time-seeded) is set to 0.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import re
from dataclasses import dataclass, field

import torch
import torchattacks
from torch import nn

from transferlab.config import LabelPolicy, Norm, choice
from transferlab.device import CPU_CRAFT_BATCH
from transferlab.errors import UserError, UserValueError, suggest


@dataclass(frozen=True)
class AttackSpec:
    name: str
    torchattacks_class: str
    description: str
    # Our defaults layered over the torchattacks class's own; alpha is derived
    # from eps and steps (see _ALPHA_FACTOR) and so is not listed here.
    defaults: dict = field(default_factory=dict)


ATTACKS: dict[str, AttackSpec] = {
    spec.name: spec
    for spec in (
        AttackSpec("fgsm", "FGSM", "fast gradient sign method: one step of size eps", {}),
        AttackSpec("pgd", "PGD", "projected gradient descent with a random start (Madry et al.)",
                   {"steps": 10, "random_start": True}),
        AttackSpec("mifgsm", "MIFGSM", "momentum iterative FGSM (Dong et al. 2018), a transfer attack",
                   {"steps": 10, "decay": 1.0}),
        AttackSpec("difgsm", "DIFGSM", "diverse-inputs iterative FGSM (random resize and pad each step)",
                   {"steps": 10}),
        AttackSpec("tifgsm", "TIFGSM", "translation-invariant iterative FGSM (gradient smoothed by a kernel)",
                   {"steps": 10, "len_kernel": 5}),
        AttackSpec("nifgsm", "NIFGSM", "Nesterov iterative FGSM", {"steps": 10, "decay": 1.0}),
        AttackSpec("vmifgsm", "VMIFGSM", "variance-tuned momentum iterative FGSM", {"steps": 10, "decay": 1.0}),
    )
}

# alpha = factor * eps / steps when the caller gives no alpha.
_ALPHA_FACTOR = {"pgd": 2.5, "mifgsm": 1.0, "difgsm": 1.0, "tifgsm": 1.0, "nifgsm": 1.0, "vmifgsm": 1.0}
_GENERIC_ALPHA_FACTOR = 2.5
_L2_ALPHA_FACTOR = 2.0  # pgd under L2: torchattacks' PGDL2 takes alpha 0.2 at eps 1.0 and 10 steps
_PREFIX = "torchattacks:"


class _FastGradientL2(torchattacks.PGDL2):
    """fgsm's L2 form, the fast gradient method: one step of length eps along the gradient divided by its
    per-image L2 norm, then [0, 1]. torchattacks has no one-step L2 attack; its PGDL2 with one step of alpha = eps
    from the clean image is exactly this step (its projection onto the ball then changes nothing), and with
    steps and alpha fixed here, fgsm ignores --steps and --alpha under L2 as it does under Linf."""

    def __init__(self, model, eps=1.0, eps_for_division=1e-10):
        super().__init__(model, eps=eps, alpha=eps, steps=1, random_start=False, eps_for_division=eps_for_division)


# Our attacks that have an L2 form, and the class that runs it.
_L2_FORMS = {"fgsm": _FastGradientL2, "pgd": torchattacks.PGDL2}


class AttackBoundError(RuntimeError):
    """An adversarial image left the eps ball or [0, 1]: a bug, never bad input."""


# ---------------------------------------------------------------- names and numbers

def list_attacks() -> list[str]:
    return list(ATTACKS)


def _torchattacks_classes() -> dict[str, type]:
    """Lower-case name -> every Attack subclass torchattacks exports."""
    classes = {}
    for name in getattr(torchattacks, "__all__", dir(torchattacks)):
        obj = getattr(torchattacks, name, None)
        if inspect.isclass(obj) and issubclass(obj, torchattacks.attack.Attack):
            classes[name.lower()] = obj
    return classes


def _init_params(cls) -> dict[str, inspect.Parameter]:
    """The constructor's keyword parameters, without self and model."""
    params = inspect.signature(cls.__init__).parameters
    return {
        name: p for name, p in params.items()
        if name not in ("self", "model") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def resolve_attack(name: str) -> str:
    """Canonical attack name: one of ATTACKS, or 'torchattacks:<Class>' for any other
    eps-bounded torchattacks attack (an L2-only class is refused: its L2 form is an attack's norm=L2)."""
    text = str(name).strip()
    lower = text.lower()
    if lower in ATTACKS:
        return lower
    classes = _torchattacks_classes()
    known = ", ".join(ATTACKS)
    if lower.startswith(_PREFIX):
        cls = classes.get(lower[len(_PREFIX):].strip())
        if cls is None:
            wanted = text[len(_PREFIX):].strip()
            names = sorted(c.__name__ for c in classes.values())
            raise UserError(
                f"torchattacks has no attack class {wanted!r}{suggest(wanted, names)}; "
                f"its attacks are: {', '.join(names)}"
            )
        # A class we wrap under our own name resolves to that name, so both
        # spellings share defaults and cache keys.
        for spec in ATTACKS.values():
            if spec.torchattacks_class == cls.__name__:
                return spec.name
        _require_linf_eps(cls)
        return _PREFIX + cls.__name__
    hint = ""
    if lower in classes:
        hint = f" (did you mean {_PREFIX}{classes[lower].__name__}?)"
    raise UserError(
        f"unknown attack {text!r}{hint or suggest(lower, ATTACKS)}; known: {known}; "
        f"any other torchattacks attack as {_PREFIX}<Class>, e.g. {_PREFIX}APGD"
    )


def _require_linf_eps(cls) -> None:
    """Attacks are compared at equal eps of one norm, chosen by the norm option; refuse a class without an eps
    bound, and an L2-only class (PGDL2), which is what pgd's norm=L2 already runs."""
    params = _init_params(cls)
    if "eps" not in params:
        raise UserError(
            f"{_PREFIX}{cls.__name__} has no eps bound, so it cannot be used in an "
            f"eps-bounded attack matrix; choose an Linf attack such as pgd or {_PREFIX}APGD"
        )
    if cls.__name__.upper().endswith("L2"):
        raise UserError(
            f"{_PREFIX}{cls.__name__} is an L2-only attack; it is pgd with the attack option norm=L2 "
            f"(--attack pgd --attack-opt norm=L2), and L2 works with {_L2_SUPPORT_TEXT}"
        )


def _attack_class(name: str, norm: str = Norm.LINF):
    if norm == Norm.L2 and name in _L2_FORMS:
        return _L2_FORMS[name]
    if name.startswith(_PREFIX):
        return _torchattacks_classes()[name[len(_PREFIX):].lower()]
    return getattr(torchattacks, ATTACKS[name].torchattacks_class)


_L2_SUPPORT_TEXT = (f"{', '.join(_L2_FORMS)} or a {_PREFIX}<Class> that takes a norm "
                    f"({_PREFIX}APGD, APGDT, FAB, Square, AutoAttack)")


def parse_norm(value) -> Norm:
    """'Linf' or 'L2' (any case) as a Norm; anything else a one-line UserValueError."""
    return choice(Norm, value, "norm")


def norm_of(params: dict) -> Norm:
    """The norm an attack's options or resolved parameters bound (Linf when they name none)."""
    return parse_norm(params.get("norm", Norm.LINF))


def attack_label(name: str, params: dict) -> str:
    """How the tables name an attack: its name, with the norm after it where that is not Linf ('pgd-L2'), so
    the rows of an L2 and an Linf attack never share a key and Linf tables read as they always did."""
    norm = norm_of(params)
    return name if norm == Norm.LINF else f"{name}-{norm.value}"


def _take_norm(name: str, options: dict) -> Norm:
    """The norm ``options`` ask for (Linf by default), checked against the attack. It is taken out of
    ``options`` unless the attack's torchattacks class takes a norm itself (APGD ...), which then gets it."""
    native = "norm" in _init_params(_attack_class(name))
    norm = parse_norm(options.get("norm", Norm.LINF))
    if native:
        if "norm" in options:
            options["norm"] = norm.value
        return norm
    options.pop("norm", None)
    if norm != Norm.LINF and name not in _L2_FORMS:
        raise UserValueError(f"{name} has no {norm.value} form; norm={norm.value} works with {_L2_SUPPORT_TEXT}")
    return norm


def parse_eps(text: str | float, norm: str | None = Norm.LINF) -> float:
    """'0.1', '8/255' or a number -> float; anything else is a UserError. Under Linf eps is a pixel change and
    must lie in [0, 1]; under L2 it is a length and may be any finite number of 0 or more (``norm`` None: the
    range is checked later, by whoever knows the norm)."""
    if isinstance(text, bool):
        raise UserError(f"eps must be a number, got {text!r}")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        raw = str(text).strip()
        try:
            if "/" in raw:
                num, den = raw.split("/", 1)
                value = float(num) / float(den)
            else:
                value = float(raw)
        except (ValueError, ZeroDivisionError):
            raise UserError(f"cannot read eps {raw!r}: write a number such as 0.1 or 8/255") from None
    if not math.isfinite(value) or value < 0:
        raise UserError(f"eps must be a finite number of 0 or more, got {text!r}")
    if norm is not None and parse_norm(norm) == Norm.LINF and value > 1.0:
        raise UserError(f"eps must lie in [0, 1] (pixel scale), got {text!r}; an eps above 1 is an L2 radius: "
                        f"add the attack option norm=L2")
    return value


def parse_eps_list(text: str, norm: str | None = Norm.LINF) -> list[float]:
    """'0.1,0.2,8/255' -> [0.1, 0.2, 0.0313...]; repeats are dropped, order kept (ranges as parse_eps)."""
    parts = [p for p in str(text).split(",") if p.strip()]
    if not parts:
        raise UserError(f"no eps values in {text!r}: write e.g. 0.1,0.2,8/255")
    values = []
    for part in parts:
        value = parse_eps(part, norm)
        if value not in values:
            values.append(value)
    return values


_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?")


def _typed(value: str):
    """The Python value an option string most plausibly means."""
    if _INT.fullmatch(value):
        return int(value)
    if _FLOAT.fullmatch(value):
        return float(value)
    if "/" in value:
        num, den = value.split("/", 1)
        if _FLOAT.fullmatch(num.strip()) and _FLOAT.fullmatch(den.strip()) and float(den) != 0:
            return float(num) / float(den)
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    if value.lower() == "none":
        return None
    return value


def parse_attack_options(items: list[str]) -> dict:
    """['loss=ce', 'steps=20', 'decay=1.0', 'random_start=false'] -> typed dict."""
    options = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UserError(f"attack option {item!r} is not NAME=VALUE (e.g. steps=20)")
        if key in options:
            raise UserError(f"attack option {key!r} given twice")
        if key == "eps":  # eps is a matrix axis with its own flag, never an option
            raise UserError("give eps with --eps (e.g. --eps 0.1,8/255), not as an attack option")
        options[key] = _typed(value.strip())
    return options


# ---------------------------------------------------------------- parameters

def attack_params(attack: str, eps: float, steps: int | None = None, alpha: float | None = None,
                  **options) -> dict:
    """Every constructor argument the attack will get, except eps (passed on its own
    to craft and recorded in its own column). Resolving an already resolved dict
    again gives the same dict, so ``craft(..., **attack_params(...))`` is safe.

    ``options`` must be constructor arguments of the attack (a typo is a
    UserError listing the accepted ones), or ``norm`` ("Linf", the default, or "L2":
    see the module's docstring); ``steps`` and ``alpha`` are ignored by attacks that
    have no such argument (fgsm)."""
    name = resolve_attack(attack)
    options = dict(options)
    norm = _take_norm(name, options)
    eps = parse_eps(eps, norm)
    cls = _attack_class(name, norm)
    accepted = _init_params(cls)
    unknown = [key for key in options if key not in accepted]
    if unknown:
        choices = ", ".join(k for k in accepted if k != "eps") or "none"
        raise UserError(
            f"{name} has no option {unknown[0]!r}{suggest(unknown[0], accepted)}; it accepts: {choices}"
        )

    params = {k: p.default for k, p in accepted.items() if k != "eps"}
    if name in ATTACKS:
        params.update(ATTACKS[name].defaults)
    elif params.get("seed", 0) is None:
        params["seed"] = 0  # None would seed from the clock: not reproducible

    # steps and alpha are matrix-wide settings (one --steps for "fgsm,pgd"), so an
    # attack without them ignores them; they are still validated, and the returned
    # dict only lists what the attack really used.
    if steps is not None:
        steps = _positive_int_steps(steps, name)
        if "steps" in accepted:
            params["steps"] = steps
    if "steps" in params:
        params["steps"] = _positive_int_steps(params["steps"], name)

    if alpha is not None:
        alpha = float(alpha)
        # alpha 0 is only meaningful (and is what we derive) at eps 0.
        if not math.isfinite(alpha) or alpha < 0 or (alpha == 0 and eps > 0):
            raise UserError(f"alpha (step size) must be positive, got {alpha}")
    if alpha is not None and "alpha" in accepted:
        params["alpha"] = alpha
    elif "alpha" in accepted and "steps" in accepted:
        factor = _L2_ALPHA_FACTOR if norm == Norm.L2 else _ALPHA_FACTOR.get(name, _GENERIC_ALPHA_FACTOR)
        params["alpha"] = factor * eps / params["steps"]

    params.update(options)
    if norm != Norm.LINF and "norm" not in accepted:
        params["norm"] = norm.value  # recorded (and keyed); _constructor_args leaves it out
    return params


def _constructor_args(name: str, params: dict) -> dict:
    """The resolved parameters less the norm of an attack whose L2 form is a class of its own (pgd: PGDL2)."""
    return {k: v for k, v in params.items() if not (k == "norm" and name in _L2_FORMS)}


def _positive_int_steps(value, label) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
        raise UserError(f"{label}: steps must be a whole number, got {value!r}")
    if int(value) <= 0:
        raise UserError(f"{label}: steps must be at least 1, got {value}")
    return int(value)


# ---------------------------------------------------------------- crafting

class _GrayAsRGB(nn.Module):
    """Lets tifgsm (whose smoothing kernel is hard-wired to 3 channels) attack a
    1-channel model: the image is repeated to 3 channels and the model sees their
    mean. Starting from identical channels the attack keeps them identical, and in
    any case the mean, which is what the model saw, stays inside the eps ball."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x.mean(dim=1, keepdim=True))


class _Autocast(nn.Module):
    """The model's forward under bf16 autocast, logits back in fp32 for the attack's loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
            return self.model(x).float()


@contextlib.contextmanager
def _frozen_eval(model: nn.Module):
    """Eval mode and no parameter gradients for the attack; afterwards every
    module's own train/eval flag and every parameter's requires_grad come back as
    they were (a fine-tuned model may have frozen layers or BN kept in eval)."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in grads:
            p.requires_grad_(False)  # only input gradients are needed: faster
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in grads:
            p.requires_grad_(flag)


def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    for p in model.parameters():
        return p.device
    return fallback


def _check_craft_inputs(images, labels, batch_size: int) -> None:
    if not torch.is_tensor(images) or not images.is_floating_point() or images.dim() != 4:
        raise ValueError("craft needs float images shaped [N, C, H, W] with pixels in [0, 1]")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise ValueError("craft needs pixels in [0, 1]; models normalise internally")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")


def _craft_guards(model, device: torch.device):
    """The contexts crafting runs under: cuDNN off for RNNs on CUDA, and torch's RNG forked (so the caller's
    random state is left as it was)."""
    has_rnn = any(isinstance(m, nn.RNNBase) for m in model.modules())
    # cuDNN computes RNN input gradients only in train mode; the native kernels do it in eval.
    cudnn = (torch.backends.cudnn.flags(enabled=False) if has_rnn and device.type == "cuda"
             else contextlib.nullcontext())
    rng_devices = [device] if device.type == "cuda" else []
    return cudnn, torch.random.fork_rng(devices=rng_devices)


def _attack_target(model, gray_tifgsm: bool, precision: str):
    """The model as the attack sees it: gray images as RGB for tifgsm, the forward under bf16 autocast."""
    target = _GrayAsRGB(model) if gray_tifgsm else model
    if precision == "bf16":
        target = _Autocast(target)
    return target


def _make_attacker(target, name: str, eps: float, resolved: dict, target_labels, n_images: int):
    """The attack object for ``target``; targeted (torchattacks' set_mode_targeted_by_label) with target_labels."""
    try:
        attacker = _attack_class(name, norm_of(resolved))(target, eps=eps, **_constructor_args(name, resolved))
    except (ValueError, TypeError, AssertionError) as exc:
        raise UserError(f"{name} refused its options {options_text(resolved)}: {exc}; check --attack-opt") from None
    if target_labels is not None:
        if target_labels.shape[0] != n_images:
            raise ValueError(f"{n_images} images but {target_labels.shape[0]} target labels")
        try:
            attacker.set_mode_targeted_by_label(quiet=True)
        except ValueError as exc:
            raise UserError(f"{name} has no targeted mode ({exc}); choose e.g. pgd") from None
    return attacker


def _attack_batch(attacker, x: torch.Tensor, y: torch.Tensor, name: str, resolved: dict) -> torch.Tensor:
    try:
        return attacker(x, y).detach()
    except (ValueError, KeyError, AssertionError) as exc:
        if not name.startswith("torchattacks:"):
            raise
        # torchattacks checks some options only when it runs (APGD's loss): one line, not a traceback.
        raise UserError(f"{name} failed with options {options_text(resolved)}: {exc!r}; "
                        f"check --attack-opt") from None


def craft(model, images, labels, attack: str, eps: float, *, batch_size: int = 1024, seed: int = 0,
          attack_seed: int | None = None, precision: str = "fp32", target_labels=None, **params) -> torch.Tensor:
    """Adversarial images for ``images`` (float [N, C, H, W] in [0, 1]) against
    ``model``, untargeted away from ``labels``. Same shape, dtype and device as ``images``. ``params`` are as
    for ``attack_params`` (steps, alpha, options; ``norm="L2"``: eps bounds each image's L2 distance).

    ``seed`` seeds torch's generator around the attack. Some torchattacks classes
    (APGD, APGDT, AutoAttack, FAB, Square) also take their own constructor ``seed``;
    a resolved params dict carries it, and since it cannot share the keyword with
    ``seed`` it is passed as ``attack_seed`` (a ``seed`` inside ``params`` is
    accepted too, when called as ``craft(..., **attack_params(...))`` without ``seed=``).

    ``precision="bf16"`` runs the model's forward under bf16 autocast (the images, their
    gradients and the eps-ball arithmetic stay fp32), as the matrix does where it measured faster.
    On a CPU, batches hold at most ``device.CPU_CRAFT_BATCH`` images (faster there, and less memory).

    ``target_labels`` (one class per image): a targeted attack, towards those classes instead of away from
    ``labels`` (torchattacks' set_mode_targeted_by_label; attacks without a targeted mode refuse)."""
    if attack_seed is not None:
        params["seed"] = attack_seed
    name = resolve_attack(attack)
    resolved = attack_params(name, eps, **params)
    norm = norm_of(resolved)
    eps = parse_eps(eps, norm)
    _check_craft_inputs(images, labels, batch_size)
    if eps == 0 or images.shape[0] == 0:
        adversarial = images.clone()  # nothing to attack: exactly the clean images
        check_eps_ball(images, adversarial, eps, norm=norm)
        return adversarial

    device = _model_device(model, images.device)
    if device.type == "cpu":  # past a few hundred images a CPU batch no longer fits in cache (device.py)
        batch_size = min(batch_size, CPU_CRAFT_BATCH)
    gray_tifgsm = name == "tifgsm" and images.shape[1] == 1
    if name == "tifgsm" and images.shape[1] not in (1, 3):
        raise UserError(f"tifgsm supports 1- or 3-channel images, not {images.shape[1]}")
    cudnn, rng = _craft_guards(model, device)

    adversarial = torch.empty_like(images)
    with _frozen_eval(model), cudnn, rng:
        torch.manual_seed(seed)
        if "n_classes" in resolved:
            _check_n_classes(model, images[:1].to(device, torch.float32), resolved["n_classes"], name)
        target = _attack_target(model, gray_tifgsm, precision)
        attacker = _make_attacker(target, name, eps, resolved, target_labels, images.shape[0])
        if target_labels is not None:
            labels = target_labels  # towards these classes: torchattacks takes the targets as the labels
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size].to(device, torch.float32)
            y = labels[start:start + batch_size].to(device, torch.long)
            if gray_tifgsm:
                x = x.expand(-1, 3, -1, -1).contiguous()
            adv = _attack_batch(attacker, x, y, name, resolved)
            if gray_tifgsm:
                adv = adv.mean(dim=1, keepdim=True)
            adversarial[start:start + batch_size] = adv.to(images.device, images.dtype)

    # Casting back to a half-precision dtype may round by up to one unit in the last place.
    check_eps_ball(images, adversarial, eps, atol=max(1e-6, torch.finfo(images.dtype).eps), norm=norm)
    return adversarial


def options_text(params: dict) -> str:
    """The resolved options as one line for an error message: 'eps=0.1, steps=10'."""
    return ", ".join(f"{k}={v!r}" for k, v in sorted(params.items()))


def _check_n_classes(model, probe, n_classes, name) -> None:
    with torch.no_grad():
        actual = model(probe).shape[1]
    if actual != n_classes:
        raise UserError(f"{name}: the model has {actual} classes; pass the option n_classes={actual}")


def check_eps_ball(clean, adversarial, eps, atol=1e-6, norm: str = Norm.LINF) -> None:
    """Raise AttackBoundError unless every image lies within eps of its clean image and 0 <= adv <= 1.

    Linf: max |adv - clean| <= eps + atol. L2: each image's ||adv - clean||_2 <= eps (1 + 1e-5) + atol sqrt(d),
    d its number of values: ``atol`` is a per-value rounding allowance, and d such errors add up to at most
    atol sqrt(d) in L2; the relative term covers the float32 sum behind an L2 projection's own norm."""
    if clean.shape != adversarial.shape:
        raise AttackBoundError(f"adversarial shape {tuple(adversarial.shape)} != clean {tuple(clean.shape)}")
    if adversarial.numel() == 0:
        return
    change = adversarial.double() - clean.double()
    if parse_norm(norm) == Norm.L2:
        values = change[0].numel()
        diff = change.flatten(1).norm(p=2, dim=1).max().item()
        bound, what = eps * (1 + 1e-5) + atol * math.sqrt(values), "max ||adv - clean||_2"
    else:
        diff, bound, what = change.abs().max().item(), eps + atol, "max |adv - clean|"
    low, high = adversarial.min().item(), adversarial.max().item()
    # Written as "not (ok)" so that NaN counts as a breach.
    if not diff <= bound:
        raise AttackBoundError(f"adversarial images leave the {parse_norm(norm).value} eps ball: {what} = "
                               f"{diff:.6g} > eps = {eps:.6g}")
    if not (low >= -atol and high <= 1 + atol):
        raise AttackBoundError(f"adversarial pixels outside [0, 1]: min {low:.6g}, max {high:.6g}")


# ---------------------------------------------------------------- labels

LABEL_POLICIES = tuple(LabelPolicy)


def choose_label_policy(policy: str, source_label_space: str, source_dataset: str,
                        target_label_space: str, target_dataset: str) -> str:
    """'true' or 'pred': which labels the attack on the source moves away from.

    Attacking with the true MNIST labels only means something when the source's
    classes are MNIST's classes; a KMNIST source's class 3 is a Kuzushiji
    character, not the digit 3, so there the attack must move away from the
    source's own prediction instead."""
    chosen = str(policy).strip().lower()
    same = source_label_space == target_label_space or source_dataset == target_dataset
    if chosen == "pred":
        return "pred"
    if chosen == "true":
        if not same:
            raise UserError(
                f"--labels true needs the source's classes to be the target data's classes, but the "
                f"source {source_dataset} predicts {source_label_space} while {target_dataset} is labelled "
                f"with {target_label_space}; use --labels pred (attack away from the source's own prediction)"
            )
        return "true"
    if chosen == "auto":
        return "true" if same else "pred"
    raise UserError(f"unknown label policy {policy!r}{suggest(chosen, LABEL_POLICIES)}; known: {', '.join(LABEL_POLICIES)}")
