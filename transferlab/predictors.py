"""Transfer predictors: how alike two models are, measured beside the attack matrix.

For every (crafted-on, evaluated) pair of the matrix, on its shared clean sample set (pairs.csv: one row per
cell key ``crafted_on``, ``evaluated``, ``attack``, ``eps``, ``seed`` and one column per predictor):

- ``grad_cosine``: mean over samples of the cosine similarity of the two models' input
  gradients of the cross-entropy loss, each model with the labels its own attack would use
  (true labels, or its own clean predictions when its classes are not the target's).
  Demontis et al. (USENIX Security 2019) tie transfer to this alignment.
- ``cka``: linear CKA (Kornblith et al., ICML 2019) of the penultimate features, i.e. the
  input of each model's classifier layer.
- ``param_identical``: the share of parameter tensors bit-identical in both models (frozen
  tensors of a fine-tune and its source), over the larger model's tensor count;
  ``param_rel_l2``: the relative L2 distance ||a - b|| / ||a|| (a: crafter) of the remaining
  tensors whose names and shapes match (NaN when there are none to compare but some differ).
- ``clean_agreement``: the share of samples on which both predict the same class.

What each model contributes (gradients, features, predictions) is computed once per model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from transferlab.device import CPU_CRAFT_BATCH
from transferlab.tables import PAIR_COLUMNS, PREDICTORS  # noqa: F401 - the columns predictors.py computes


def _center(features: torch.Tensor) -> torch.Tensor:
    features = features.double()
    return features - features.mean(dim=0, keepdim=True)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two feature matrices [n, d1], [n, d2] over the same n samples (1 = same up to
    an orthogonal transform and an isotropic scaling). The feature-space form ||Y'X||^2 / (||X'X|| ||Y'Y||)
    costs O(n d^2), not the O(n^2) of the Gram-matrix form."""
    x, y = _center(x), _center(y)
    cross = (y.T @ x).pow(2).sum()
    norm = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return float(cross / norm) if norm > 0 else float("nan")


def gradient_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over samples of the cosine similarity of two per-sample gradient sets [n, ...]."""
    return float(F.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1, eps=1e-30).mean())


def parameter_overlap(a: torch.nn.Module, b: torch.nn.Module) -> tuple[float, float]:
    """(share of bit-identical parameter tensors, relative L2 distance of the other matching ones)."""
    params_a, params_b = dict(a.named_parameters()), dict(b.named_parameters())
    identical = 0
    diff_sq = norm_sq = 0.0
    compared = differing = 0
    for name, pa in params_a.items():
        pb = params_b.get(name)
        if pb is None or pa.shape != pb.shape:
            continue
        pa, pb = pa.detach().cpu(), pb.detach().cpu()
        if pa.dtype == pb.dtype and torch.equal(pa, pb):
            identical += 1
            continue
        differing += 1
        compared += 1
        diff_sq += float((pa.double() - pb.double()).pow(2).sum())
        norm_sq += float(pa.double().pow(2).sum())
    share = identical / max(len(params_a), len(params_b), 1)
    if differing == 0 and share == 1.0:
        return share, 0.0
    rel = math.sqrt(diff_sq / norm_sq) if compared and norm_sq > 0 else float("nan")
    return share, rel


class Profile:
    """What one model contributes to the predictors on the sample set."""

    def __init__(self, gradients: torch.Tensor, features: torch.Tensor, predictions: torch.Tensor):
        self.gradients, self.features, self.predictions = gradients, features, predictions


def profile(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor | None,
            batch_size: int = 500) -> Profile:
    """Input gradients of the loss (w.r.t. ``labels``; None: the model's own predictions), penultimate
    features and predictions, in fp32.

    The penultimate features are the input of the classifier layer, caught by a forward hook, so
    every family with ``get_classifier()`` works without knowing its internals."""
    if images.device.type == "cpu":  # input gradients as crafting computes them: faster, and less memory
        batch_size = min(batch_size, CPU_CRAFT_BATCH)
    was_training = model.training
    model.eval()
    captured: list[torch.Tensor] = []
    # An ensemble (mean of logits) has no one penultimate layer: its CKA is left undefined (NaN).
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    hook = head.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0].detach().flatten(1).float())) \
        if head is not None else None
    grads, feats, preds = [], [], []
    try:
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].detach().float().clone().requires_grad_(True)
            logits = model(x).float()
            y = logits.detach().argmax(1) if labels is None else labels[start:start + batch_size].to(x.device)
            loss = F.cross_entropy(logits, y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x)
            grads.append(grad.flatten(1).cpu())
            feats.append(captured.pop().cpu() if head is not None else torch.full((len(x), 1), float("nan")))
            preds.append(logits.argmax(1).cpu())
    finally:
        if hook is not None:
            hook.remove()
        model.train(was_training)
    return Profile(torch.cat(grads), torch.cat(feats), torch.cat(preds))


def pair_row(crafted_on: str, evaluated: str, a: Profile, b: Profile, model_a, model_b) -> dict:
    share, rel = parameter_overlap(model_a, model_b)
    return {"crafted_on": crafted_on, "evaluated": evaluated,
            "grad_cosine": gradient_cosine(a.gradients, b.gradients),
            "cka": linear_cka(a.features, b.features),
            "param_identical": share, "param_rel_l2": rel,
            "clean_agreement": float((a.predictions == b.predictions).float().mean())}
