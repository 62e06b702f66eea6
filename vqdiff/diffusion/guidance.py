"""Classifier-free guidance (Ho & Salimans 2022): one network call on a batch of 2B, then a combination.

`cond` and `null_cond` are dicts of keyword arguments for the network with the batch on dim 0
(e.g. {"text": [B, L, D], "text_mask": [B, L]}); they are concatenated, never called twice.
"""

import torch
import torch.nn.functional as F


def concat_cond(cond: dict, null_cond: dict) -> dict:
    """Stack conditional and null inputs along the batch: first B rows conditional, last B null."""
    if set(cond) != set(null_cond):
        raise ValueError(f"null_cond keys {sorted(null_cond)} differ from cond keys {sorted(cond)}")
    return {k: torch.cat([cond[k], null_cond[k]], dim=0) for k in cond}


def guided_call(model, x: torch.Tensor, t: torch.Tensor, cond: dict, null_cond: dict | None,
                guidance_scale: float):
    """Return (conditional output, null output or None); callers combine the two (`guide`), None as identity.
    With scale 1 or no null_cond: one B-sized call. A model that `guides` takes x and t once with the 2B
    conditions and `guidance_scale`, and returns the guided output itself: (guided output, None)."""
    if guidance_scale == 1.0 or null_cond is None:
        return model(x, t, **cond), None
    if getattr(model, "guides", False):
        return model(x, t, guidance_scale=guidance_scale, **concat_cond(cond, null_cond)), None
    out = model(torch.cat([x, x]), torch.cat([t, t]), **concat_cond(cond, null_cond))
    cond_out, null_out = out.chunk(2, dim=0)
    return cond_out, null_out


def guide(cond_out: torch.Tensor, null_out: torch.Tensor | None, guidance_scale: float) -> torch.Tensor:
    """null + s * (cond - null): used on epsilon / x0 / v predictions of Gaussian models."""
    if null_out is None:
        return cond_out
    return null_out + guidance_scale * (cond_out - null_out)


def guide_log_probs(cond_log_p: torch.Tensor, null_log_p: torch.Tensor | None, guidance_scale: float,
                    dim: int = 1) -> torch.Tensor:
    """Guidance on log p(x0 | x_t) of discrete models, renormalised over `dim` (Tang et al. 2022, eq. 10)."""
    if null_log_p is None:
        return cond_log_p
    return F.log_softmax(null_log_p + guidance_scale * (cond_log_p - null_log_p), dim=dim)
