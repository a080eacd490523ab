"""Stratified subsets: the seeded, class-balanced selection behind every ``n`` in a study."""

from __future__ import annotations

import torch

from transferlab.errors import UserError


def stratified_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Sorted int64 indices of ``n`` items whose class mix matches ``labels``.

    Each class gets its share n * count / total rounded by largest remainder (ties go to
    the lower class), and at least one item, so every class present appears. Within a
    class the items are the first of one seeded random permutation, so the result depends
    only on (labels, n, seed).
    """
    labels = torch.as_tensor(labels).reshape(-1).to(torch.int64)
    total = int(labels.numel())
    classes, counts = torch.unique(labels, return_counts=True)
    if not (len(classes) <= n <= total):
        raise UserError(
            f"subset size {n} is out of range: it must be between {len(classes)} (one per class present) "
            f"and {total} (all items)"
        )

    counts_list = [int(c) for c in counts]
    quotas = [n * c / total for c in counts_list]
    allocation = [int(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - allocation[i]), i))
    for i in by_remainder[: n - sum(allocation)]:
        allocation[i] += 1
    # A class too rare to earn an item takes one from the class furthest above its quota
    # among those that can spare one (n >= number of classes guarantees there is one).
    for i, amount in enumerate(allocation):
        if amount == 0:
            donors = [j for j in range(len(allocation)) if allocation[j] > 1]
            donor = max(donors, key=lambda j: (allocation[j] - quotas[j], -j))
            allocation[donor] -= 1
            allocation[i] = 1

    generator = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(total, generator=generator)
    shuffled_labels = labels[order]
    chosen = [order[shuffled_labels == cls][:amount] for cls, amount in zip(classes, allocation)]
    return torch.sort(torch.cat(chosen)).values.to(torch.int64)
