"""Losses shared by the ground-truth trainer and the audit (`--loss validation/losses.py:contrastive`).

Each has the audit's custom-loss signature `fn(model, batch) -> scalar tensor`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

#: temperature of the in-batch contrastive loss
TAU = 0.1


def _mean_pool(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the last hidden states over real tokens, L2-normalized (sentence-transformers' pooling)."""
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    hidden = out.hidden_states[-1] if getattr(out, "hidden_states", None) is not None else out.last_hidden_state
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    return F.normalize(pooled, dim=-1)


def contrastive(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Symmetric in-batch InfoNCE over (a, b) pairs: a_i must pick b_i among the batch's b's.

    Its value depends on the batch size (log n at chance): the trainer evaluates it
    in chunks of the micro-batch size for that reason.
    """
    a = _mean_pool(model, batch["a_input_ids"], batch["a_attention_mask"])
    b = _mean_pool(model, batch["b_input_ids"], batch["b_attention_mask"])
    logits = a @ b.T / TAU
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def causal_lm(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """transformers' own next-token loss with the batch's labels (-100 = not scored)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
