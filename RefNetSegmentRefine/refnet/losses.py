"""The RefNet training loss: CE(P, GT) + Dice(P, GT) + w * CE(P, S).

The last term pulls the prediction P towards the raw segmentation S so RefNet corrects rather than
re-segments (the paper uses w = 1). Built from MONAI's DiceLoss and torch's cross-entropy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.losses import DiceCELoss, DiceLoss
from torch import nn
from torch.nn import functional as F

__all__ = ["BatchDiceCELoss", "RefNetLoss"]


class RefNetLoss(nn.Module):
    """``CE(P, GT) + dice_weight * Dice(P, GT) + raw_weight * CE(P, S)``.

    Args:
        raw_weight: weight ``w`` of the cross-entropy towards the raw labels (paper: 1.0).
        dice_weight: weight of the soft Dice term (paper: 1.0).
        class_weights: optional per-class weights of both cross-entropy terms (length C), to let
            small classes count; None weighs all classes equally.

    Raises:
        ValueError: negative weights.
    """

    def __init__(
        self, *, raw_weight: float = 1.0, dice_weight: float = 1.0, class_weights: Sequence[float] | None = None
    ) -> None:
        super().__init__()
        if raw_weight < 0 or dice_weight < 0:
            raise ValueError(f"loss weights must be >= 0, got raw_weight={raw_weight}, dice_weight={dice_weight}.")
        self.raw_weight = float(raw_weight)
        self.dice_weight = float(dice_weight)
        weight = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        if weight is not None and (weight.ndim != 1 or bool((weight < 0).any())):
            raise ValueError("class_weights must be a 1D sequence of non-negative numbers.")
        self.register_buffer("class_weights", weight, persistent=False)
        # batch=True: Dice over the whole batch, so a class absent from one slice does not dominate.
        self.dice = DiceLoss(to_onehot_y=True, softmax=True, include_background=True, batch=True)

    def terms(self, logits: torch.Tensor, target: torch.Tensor, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        """The three loss terms, unweighted.

        Args:
            logits: (B, C, H, W) float logits P.
            target: (B, H, W) int64 ground-truth classes GT.
            raw: (B, H, W) int64 raw segmentation classes S.

        Returns:
            ``{"ce_gt", "dice_gt", "ce_raw"}`` scalar tensors.
        """
        if logits.ndim != 4 or target.shape != logits.shape[:1] + logits.shape[2:] or raw.shape != target.shape:
            raise ValueError(
                f"expected logits (B, C, H, W) and target/raw (B, H, W), got {tuple(logits.shape)}, "
                f"{tuple(target.shape)}, {tuple(raw.shape)}."
            )
        weight = self.class_weights
        return {
            "ce_gt": F.cross_entropy(logits, target, weight=weight),
            "dice_gt": self.dice(logits, target[:, None]),
            "ce_raw": F.cross_entropy(logits, raw, weight=weight),
        }

    def forward(self, logits: torch.Tensor, target: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        """Weighted sum of :meth:`terms`; shapes as there."""
        t = self.terms(logits, target, raw)
        return t["ce_gt"] + self.dice_weight * t["dice_gt"] + self.raw_weight * t["ce_raw"]


class BatchDiceCELoss(nn.Module):
    """MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True, batch=True)`` for the base models, exact under
    DistributedDataParallel too.

    With ``batch=True`` the Dice sums run over the whole batch; under torchrun each process holds only
    its share, so the per-process loss would be another loss. Here, with ``world > 1``, the per-class sums
    (intersection, ground truth, prediction) are summed across processes with the autograd-aware
    ``torch.distributed.nn.functional.all_reduce``: every process computes the whole batch's Dice, and the
    gradients DDP averages equal one process's on the whole batch (the cross-entropy is a mean over equal
    shares, which DDP's averaging already makes global). With one process it is MONAI's loss itself.

    Args:
        world: number of processes sharing each batch.
    """

    def __init__(self, world: int = 1) -> None:
        super().__init__()
        self.world = int(world)
        self.monai = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``logits`` (B, C, ...) and ``target`` (B, 1, ...) class indices; returns the scalar loss."""
        if self.world == 1:
            return self.monai(logits, target)
        return self.sharded(logits, target, all_reduce=_all_reduce_sum)

    def sharded(self, logits: torch.Tensor, target: torch.Tensor, *, all_reduce) -> torch.Tensor:
        """The loss from this process's share, given how to sum tensors across processes (same formula as
        MONAI: Dice 1 - (2 I + 1e-5) / (G + P + 1e-5) per class, averaged, plus the mean cross-entropy)."""
        dice = self.monai.dice
        ce = F.cross_entropy(logits, target[:, 0].long())
        probs = torch.softmax(logits, dim=1)
        onehot = F.one_hot(target[:, 0].long(), logits.shape[1]).movedim(-1, 1).to(probs.dtype)
        dims = [0, *range(2, logits.ndim)]
        sums = all_reduce(torch.stack([(probs * onehot).sum(dims), onehot.sum(dims), probs.sum(dims)]))
        score = 1.0 - (2.0 * sums[0] + dice.smooth_nr) / (sums[1] + sums[2] + dice.smooth_dr)
        return self.monai.lambda_dice * score.mean() + self.monai.lambda_ce * ce


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(t)
