"""The DSD objective: DiceCE on the main output and decoder heads plus temperature-scaled KL distillation."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import DiceCELoss

from ..config import DSDConfig
from ..networks.dsd_net import DSDOutput


def pixelwise_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) ‖ softmax(s/T)) summed over classes, averaged over batch and voxels (no T² here)."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    p_teacher = F.softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_p_student, p_teacher, reduction="none", log_target=False).sum(dim=1).mean()


class DSDLoss(nn.Module):
    """Loss of :class:`~DSDSegmentationLib.engine.networks.DSDNet` outputs against integer labels (B, 1, ...).

    ``forward`` returns the total; :attr:`last_terms` holds every term (detached floats) for logging:
    ``gt/main``, ``gt/<dec head>``, ``kl/<student>``, and the weighted sums ``gt``, ``kl_dec``, ``kl_enc``.
    """

    def __init__(self, config: DSDConfig | None = None):
        super().__init__()
        self.config = config or DSDConfig()
        self.dice_ce = DiceCELoss(include_background=True, to_onehot_y=True, softmax=True, lambda_dice=1.0, lambda_ce=1.0)
        self.last_terms: dict[str, float] = {}

    def forward(self, output: DSDOutput | torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        c = self.config
        terms: dict[str, float] = {}
        if isinstance(output, torch.Tensor):  # plain network or eval-mode output
            loss = c.main_weight * self.dice_ce(output, target)
            terms["gt/main"] = float(loss.detach())
            self.last_terms = terms
            return loss
        main = self.dice_ce(output.main, target)
        terms["gt/main"] = float(main.detach())
        total = c.main_weight * main
        if c.deep_supervision:
            for name, logits in zip(output.dec_names, output.dec):
                term = self.dice_ce(logits, target)
                terms[f"gt/{name}"] = float(term.detach())
                total = total + c.ds_weight * term
        scale = c.kl_weight * c.temperature**2
        for enabled, group, heads, names in (
            (c.decoder_kl, "kl_dec", output.dec, output.dec_names),
            (c.encoder_kl, "kl_enc", output.enc, output.enc_names),
        ):
            if not enabled:
                continue
            if len(heads) < 2:
                raise ValueError(f"{group} needs a teacher and at least one student head; the network has {len(heads)} head(s)")
            teacher = heads[-1].detach() if c.detach_teacher else heads[-1]
            group_sum = torch.zeros((), device=output.main.device)
            for name, student in zip(names[:-1], heads[:-1]):
                kl = pixelwise_kl(teacher, student, c.temperature)
                terms[f"kl/{name}"] = float(kl.detach())
                group_sum = group_sum + kl
            terms[group] = float(group_sum.detach()) * scale
            total = total + scale * group_sum
        terms["total"] = float(total.detach())
        self.last_terms = terms
        return total
