"""The DSD objective: DiceCE on the main output and decoder heads plus temperature-scaled KL distillation.

All GT terms are evaluated in one batched pass that shares one log-softmax between Dice and CE, and all KL
terms of one teacher in another; the values equal MONAI's ``DiceCELoss`` (``include_background=True``,
softmax, one-hot labels, ``smooth_nr = smooth_dr = 1e-5``, Dice and CE weight 1) and a per-voxel KL, as the
tests check. Batching keeps the loss cheap next to the backbone, which the <= 10 % step-time target needs.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import DSDConfig
from ..networks.dsd_net import DSDOutput

SMOOTH = 1e-5  # MONAI DiceLoss smooth_nr / smooth_dr defaults


def pixelwise_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) ‖ softmax(s/T)) summed over classes, averaged over batch and voxels (no T² here)."""
    return kl_per_student(teacher_logits, [student_logits], temperature)[0]


def kl_per_student(teacher: torch.Tensor, students: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """Per-voxel KL of each student against one teacher: a tensor of len(students).

    KL = Σ_c p_t log p_t − Σ_c p_t log p_s; the teacher part is computed once and broadcast over students.
    """
    n, b, k = len(students), teacher.shape[0], teacher.shape[1]
    log_pt = F.log_softmax(teacher / temperature, dim=1).reshape(1, b, k, -1)
    pt = log_pt.exp()
    log_ps = F.log_softmax(torch.cat(students, 0) / temperature, dim=1).reshape(n, b, k, -1)
    neg_entropy = (pt * log_pt).sum(dim=2)  # (1, B, V)
    cross = (pt * log_ps).sum(dim=2)  # (n, B, V)
    return (neg_entropy - cross).mean(dim=(1, 2))


def dice_ce_per_output(logits: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """MONAI-equivalent DiceCE of each logits tensor (B, K, ...) against integer labels (B, 1, ...)."""
    n, b, k = len(logits), target.shape[0], logits[0].shape[1]
    z = torch.cat(logits, 0) if n > 1 else logits[0]
    logp = F.log_softmax(z, dim=1).reshape(n, b, k, -1)
    p = logp.exp()
    labels = target.reshape(1, b, 1, -1).long()
    onehot = torch.zeros((1, b, k, labels.shape[-1]), dtype=p.dtype, device=p.device).scatter_(2, labels, 1.0)
    inter = (p * onehot).sum(-1)  # (n, B, K)
    denom = p.sum(-1) + onehot.sum(-1)
    dice = 1.0 - (2.0 * inter + SMOOTH) / (denom + SMOOTH)
    ce = -torch.gather(logp, 2, labels.expand(n, b, 1, -1)).mean(dim=(1, 2, 3))
    return dice.mean(dim=(1, 2)) + ce


class DSDLoss(nn.Module):
    """Loss of :class:`~DSDSegmentationLib.engine.networks.DSDNet` outputs against integer labels (B, 1, ...).

    ``forward`` returns the total; :attr:`last_terms` holds every term (floats) for logging: ``gt/main``,
    ``gt/<dec head>``, ``kl/<student>``, the weighted group sums ``gt``, ``kl_dec``, ``kl_enc`` and ``total``.
    """

    def __init__(self, config: DSDConfig | None = None):
        super().__init__()
        self.config = config or DSDConfig()
        self.last_terms: dict[str, float] = {}

    def forward(self, output: DSDOutput | torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        c = self.config
        if isinstance(output, torch.Tensor):  # plain network or eval-mode output
            output = DSDOutput(output, (), (), (), ())
        names, logits, weights = ["main"], [output.main], [c.main_weight]
        if c.deep_supervision:
            names += list(output.dec_names)
            logits += list(output.dec)
            weights += [c.ds_weight] * len(output.dec)
        gt = dice_ce_per_output(logits, target)
        total = (gt * gt.new_tensor(weights)).sum()
        values = [gt.detach()]
        keys = [f"gt/{n}" for n in names]
        group_totals = {"gt": total.detach()}
        scale = c.kl_weight * c.temperature**2
        for enabled, group, heads, head_names in (
            (c.decoder_kl and bool(output.dec), "kl_dec", output.dec, output.dec_names),
            (c.encoder_kl and bool(output.enc), "kl_enc", output.enc, output.enc_names),
        ):
            if not enabled:
                continue
            if len(heads) < 2:
                raise ValueError(f"{group} needs a teacher and at least one student head; got {len(heads)} head(s)")
            teacher = heads[-1].detach() if c.detach_teacher else heads[-1]
            kl = kl_per_student(teacher, list(heads[:-1]), c.temperature)
            values.append(kl.detach())
            keys += [f"kl/{n}" for n in head_names[:-1]]
            group_loss = scale * kl.sum()
            group_totals[group] = group_loss.detach()
            total = total + group_loss
        group_totals["total"] = total.detach()
        flat = torch.cat(values + [torch.stack(list(group_totals.values()))]).tolist()  # one sync for all terms
        self.last_terms = dict(zip(keys + list(group_totals), flat))
        return total
