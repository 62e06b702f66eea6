"""Losses and metrics for training the Gumbel VQ-VAE tokenizer (taming-transformers' VQLPIPSWithDiscriminator).

Generator step: reconstruction (L1 or L2, plus an optional VGG perceptual distance) + the quantizer's weighted KL
(`model_out["kl_loss"]`) + an adaptively weighted hinge GAN term once the discriminator has started (Esser et al.
2021, eq. 6-7). Discriminator step: the hinge loss on real images and detached reconstructions.
"""

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..models.discriminator import DiscriminatorNorm, PatchDiscriminator
from ..options import ReconLoss


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """lambda = ||grad_L nll|| / (||grad_L g_loss|| + 1e-4) at the decoder's last layer L (Esser et al. 2021, eq. 7),
    so the GAN term never outweighs reconstruction in that layer; detached."""
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (nll_grads.norm() / (g_grads.norm() + 1e-4)).clamp(0.0, max_weight).detach()


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the per-image PSNR (dB) of [B, C, H, W] images in [-1, 1] (peak-to-peak 2)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(4.0 / mse)).mean()


def codebook_counts(tokens: torch.Tensor, num_codes: int) -> torch.Tensor:
    """How often each of `num_codes` ids occurs in a token tensor of any shape: int64 [num_codes]."""
    return torch.bincount(tokens.flatten().long(), minlength=num_codes)


def codebook_perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the empirical code distribution: from 1 (one code) to the number of codes (all equally)."""
    p = counts.double() / counts.sum().clamp_min(1)
    return torch.exp(-torch.special.xlogy(p, p).sum()).float()


# torchvision vgg16.features: the convolutions, and the five ReLU outputs LPIPS compares
VGG16_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG16_POOL_AFTER = (2, 7, 14, 21)
VGG16_TAP_AFTER = (2, 7, 14, 21, 28)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
VGG16_WIDTHS = (64, 128, 256, 512, 512)


def vgg_state_names(state: dict) -> dict:
    """Maps torchvision (`features.{i}.*`), taming LPIPS (`net.slice{s}.{i}.*`, `lin{k}.model.1.weight`) and LPIPS
    v0.1 (`lin{k}.model.1.weight`) names onto `features.{i}.{weight,bias}` and `lin{k}`; other keys are dropped."""
    renamed = {}
    for key, value in state.items():
        if m := re.fullmatch(r"(?:features|net\.slice\d)\.(\d+)\.(weight|bias)", key):
            renamed[f"features.{m[1]}.{m[2]}"] = value
        elif m := re.fullmatch(r"lin(\d)\.model\.\d\.weight", key):
            renamed[f"lin{m[1]}"] = value
    return renamed


class VGGPerceptual(nn.Module):
    """LPIPS-style perceptual distance (Zhang et al. 2018) on frozen VGG16 features from local weight files.

    Per layer: unit-normalise channels, square the difference, weight channels by LPIPS's linear heads when the
    files hold them (else sum them), average over space; sum over the five layers. Weights are non-persistent
    buffers, so they never enter a checkpoint nor an optimizer. Nothing is downloaded."""

    def __init__(self, paths: str | Path | list[str | Path]):
        super().__init__()
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        state = {}
        for path in paths:
            state.update(vgg_state_names(torch.load(path, map_location="cpu", weights_only=True)))
        missing = [f"features.{i}.{p}" for i in VGG16_CONVS for p in ("weight", "bias")
                   if f"features.{i}.{p}" not in state]
        if missing:
            raise KeyError(f"perceptual weights {paths} lack VGG16 tensors: {missing}")
        lins = [state.get(f"lin{k}") for k in range(5)]
        if any(lin is None for lin in lins) and any(lin is not None for lin in lins):
            raise KeyError(f"perceptual weights {paths} hold only some LPIPS heads lin0..lin4")
        for i in VGG16_CONVS:
            self.register_buffer(f"weight_{i}", state[f"features.{i}.weight"].float(), persistent=False)
            self.register_buffer(f"bias_{i}", state[f"features.{i}.bias"].float(), persistent=False)
        self.has_heads = lins[0] is not None
        for k, lin in enumerate(lins if self.has_heads else []):
            self.register_buffer(f"lin_{k}", lin.float().reshape(1, VGG16_WIDTHS[k], 1, 1), persistent=False)
        # LPIPS ScalingLayer: [-1, 1] images to ImageNet statistics
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, taps = (x - self.shift) / self.scale, []
        for i in VGG16_CONVS:
            h = F.relu(F.conv2d(h, getattr(self, f"weight_{i}"), getattr(self, f"bias_{i}"), padding=1))
            if i in VGG16_TAP_AFTER:
                taps.append(h)
            if i in VGG16_POOL_AFTER:
                h = F.max_pool2d(h, 2)
        return taps

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Distance [B] between image batches in [-1, 1]."""
        total = 0.0
        for k, (fx, fy) in enumerate(zip(self.features(x), self.features(y))):
            fx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            fy = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            diff = (fx - fy).pow(2)
            weighted = (diff * getattr(self, f"lin_{k}")) if self.has_heads else diff
            total = total + weighted.sum(1).mean((1, 2))
        return total


class VQVAELoss(nn.Module):
    """The tokenizer's training objective; owns the PatchGAN discriminator (`discriminator`, None without GAN).

    The trainer alternates `generator_loss` (VQ-VAE optimizer) and, when `discriminator_active(step)`,
    `discriminator_loss` (an optimizer over `discriminator.parameters()`). The generator step also leaves gradients
    in the discriminator: zero them before its own backward."""

    def __init__(self, recon: ReconLoss | str = ReconLoss.L1, codebook_weight: float = 1.0,
                 disc_weight: float = 0.0, disc_start: int = 0, disc_factor: float = 1.0, disc_layers: int = 3,
                 disc_channels: int = 64, disc_norm: DiscriminatorNorm | str = DiscriminatorNorm.BATCH,
                 in_channels: int = 3, perceptual_weight: float = 0.0,
                 perceptual_path: str | Path | list[str | Path] | None = None):
        super().__init__()
        self.recon = ReconLoss(recon)
        if min(codebook_weight, disc_weight, disc_factor, perceptual_weight) < 0 or disc_start < 0:
            raise ValueError("loss weights and disc_start must be non-negative")
        if perceptual_weight > 0 and perceptual_path is None:
            raise ValueError("perceptual_weight > 0 needs perceptual_path, a local VGG16/LPIPS weights file "
                             "(nothing is downloaded)")
        self.codebook_weight = codebook_weight
        self.disc_weight, self.disc_start, self.disc_factor = disc_weight, disc_start, disc_factor
        self.perceptual_weight = perceptual_weight
        self.discriminator = (PatchDiscriminator(in_channels, disc_channels, disc_layers, disc_norm)
                              if disc_weight > 0 else None)
        self.perceptual = VGGPerceptual(perceptual_path) if perceptual_weight > 0 else None

    def discriminator_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.disc_start

    def generator_loss(self, model_out: dict, images: torch.Tensor, step: int,
                       last_layer: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """model_out: GumbelVQVAE's forward dict; last_layer: model.last_layer (needed once the GAN is active)."""
        recon = model_out["recon"]
        diff = recon - images
        rec = diff.abs() if self.recon is ReconLoss.L1 else diff.pow(2)  # [B, C, H, W]
        nll_loss = rec.mean()
        logs = dict(rec_loss=nll_loss.detach())
        if self.perceptual is not None:
            p_loss = self.perceptual(images.contiguous(), recon.contiguous())  # [B]
            nll_loss = nll_loss + self.perceptual_weight * p_loss.mean()
            logs["perceptual_loss"] = p_loss.mean().detach()
        loss = nll_loss + self.codebook_weight * model_out["kl_loss"]
        if self.discriminator_active(step):
            g_loss = -self.discriminator(recon.contiguous()).mean()
            if torch.is_grad_enabled():
                if last_layer is None:
                    raise ValueError("the GAN term needs last_layer (model.last_layer) for its adaptive weight")
                d_weight = adaptive_weight(nll_loss, g_loss, last_layer) * self.disc_weight
            else:
                d_weight = torch.zeros((), device=images.device)
            loss = loss + d_weight * self.disc_factor * g_loss
            logs.update(g_loss=g_loss.detach(), d_weight=d_weight,
                        disc_factor=torch.tensor(self.disc_factor, device=images.device))
        logs.update(loss=loss.detach(), nll_loss=nll_loss.detach(), kl=model_out["kl"].detach(),
                    kl_loss=model_out["kl_loss"].detach(), psnr=psnr(recon.detach().clamp(-1, 1), images))
        return loss, logs

    def discriminator_loss(self, images: torch.Tensor, recon: torch.Tensor,
                           step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Hinge loss on real images and (detached) reconstructions; 0 before `disc_start`."""
        if self.discriminator is None:
            raise ValueError("discriminator_loss called but the discriminator is off (disc_weight = 0)")
        logits_real = self.discriminator(images.contiguous().detach())
        logits_fake = self.discriminator(recon.contiguous().detach())
        factor = self.disc_factor if step >= self.disc_start else 0.0
        loss = factor * hinge_d_loss(logits_real, logits_fake)
        return loss, dict(disc_loss=loss.detach(), logits_real=logits_real.detach().mean(),
                          logits_fake=logits_fake.detach().mean())
