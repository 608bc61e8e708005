"""Replay distillation: the candidate's predictions on source rows pulled toward the served model's.

Replay's labels say only which class a source image is; the served model's logits on it also say
how sure it was and what it confused it with, which is what the retrain must not forget. So every
replay row's loss adds ``distill_weight`` x the KL divergence between the served model's and the
candidate's softened predictions (Learning without Forgetting, on replay rows as in Dark Experience
Replay). Production rows are not distilled: there the served model is what drifted.

Opt-in (``hyper.distill_weight``, 0 by default). On the MobileNetV2 bench (bench/README.md,
"Replay distillation") it kept the source within a point in more cells but cost target accuracy
where a fine-tune followed: the head it trains is farther from the production optimum, and the
range test on it chose rates 3-20x higher.
"""

from __future__ import annotations

import torch
from torch import nn

from retrain.batches import Split

# Hinton et al.'s and LwF's softening: at T 1 the served model's confident source predictions are
# nearly one-hot and add little to the labels; T 2 keeps its second choices in the target.
TEMPERATURE = 2.0


def distill_loss(logits: torch.Tensor, batch: Split, weight: float) -> torch.Tensor | None:
    """``weight`` x T^2 x KL(served || candidate) at temperature T, averaged over the batch's
    distilled rows; None when the batch has none (or weight is 0)."""
    if weight <= 0 or batch.teacher is None or batch.distilled is None:
        return None
    rows = batch.distilled.to(logits.device)
    if not bool(rows.any()):
        return None
    student = nn.functional.log_softmax(logits[rows] / TEMPERATURE, dim=1)
    target = nn.functional.log_softmax(batch.teacher.to(logits.device)[rows].float() / TEMPERATURE, dim=1)
    kl = nn.functional.kl_div(student, target, log_target=True, reduction="batchmean")
    return weight * TEMPERATURE**2 * kl
