"""Losses of the engine."""

from .dsd_loss import DSDLoss, dice_ce_per_output, kl_per_student, pixelwise_kl

__all__ = ["DSDLoss", "dice_ce_per_output", "kl_per_student", "pixelwise_kl"]
