"""Losses of the engine."""

from .dsd_loss import DSDLoss, pixelwise_kl

__all__ = ["DSDLoss", "pixelwise_kl"]
