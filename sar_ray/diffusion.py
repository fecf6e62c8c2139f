"""Pure step maths of latent diffusion training: latents, noise, targets, weighted loss.

Follows diffusers' train_text_to_image(_sdxl).py: latent scale from `vae.config.scaling_factor`,
the target from the scheduler's `prediction_type`, min-SNR-gamma weights, offset noise, SDXL
micro-conditioning through `added_cond_kwargs`. Every random draw comes from one explicit
`torch.Generator` so that a resumed run reproduces the uninterrupted one exactly.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from .config import TrainConfig
from .models import Components, encode_text


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar, what backward() is called on
    diffusion_loss: torch.Tensor  # scalar, detached
    vae_loss: torch.Tensor | None  # scalar, detached; only when the VAE is tuned


def autocast(device: torch.device, mixed_precision: str):
    """bf16/fp16 autocast; trainable parameters stay fp32 (optimizer sees fp32 master weights)."""
    if mixed_precision == "no":
        return nullcontext()
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def sdxl_time_ids(batch: int, resolution: int, device: torch.device) -> torch.Tensor:
    """SDXL micro-conditioning: (original h, w, crop top, left, target h, w); (B, 6).

    Images reach the model already resized and cropped to `resolution`, so original and target
    size are both the training resolution and the crop offset is zero.
    """
    ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32)
    return ids.to(device).repeat(batch, 1)


def encode_latents(vae, pixel_values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/f, W/f)."""
    vae_dtype = next(vae.parameters()).dtype
    dist = vae.encode(pixel_values.to(vae_dtype)).latent_dist
    latents = dist.sample(generator=generator)
    # The scale comes from the model's own config (0.18215 SD, 0.13025 SDXL), never hard-coded.
    return latents.float() * vae.config.scaling_factor


def vae_reconstruction_loss(vae, pixel_values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """What a tuned VAE learns from: L1 reconstruction of the SAR image plus a small KL term.

    Diffusion-loss gradients are never sent into the VAE encoder: they would reward latents
    that are easy to denoise (collapse), not latents that describe SAR well.
    """
    posterior = vae.encode(pixel_values).latent_dist
    z = posterior.sample(generator=generator)
    recon = vae.decode(z).sample  # (B, 3, H, W)
    return F.l1_loss(recon.float(), pixel_values.float()) + 1e-6 * posterior.kl().mean()


def draw_noise(latents: torch.Tensor, generator: torch.Generator, noise_offset: float) -> torch.Tensor:
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
    if noise_offset > 0:
        # Offset noise (Guttenberg 2023): lets the model learn very dark/bright images, which
        # matters for SAR, where water and radar shadow are near zero amplitude.
        offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator)
        noise = noise + noise_offset * offset.to(latents.device, latents.dtype)
    return noise


def target_for(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}; use epsilon or v_prediction")


def loss_weights(scheduler, timesteps: torch.Tensor, min_snr_gamma: float | None) -> torch.Tensor | None:
    """Min-SNR-gamma weights (Hang et al. 2023), as in diffusers' training scripts; (B,)."""
    if min_snr_gamma is None:
        return None
    snr = compute_snr(scheduler, timesteps)
    weights = torch.clamp(snr, max=min_snr_gamma)
    if scheduler.config.prediction_type == "epsilon":
        return weights / snr
    return weights / (snr + 1)  # v_prediction


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return F.mse_loss(pred.float(), target.float())
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights.to(per_sample.device)).mean()


def compute_loss(
    c: Components,
    pixel_values: torch.Tensor,
    captions: list[str],
    tcfg: TrainConfig,
    generator: torch.Generator,
    tune_vae: bool,
    resolution: int,
) -> StepOutput:
    """One micro-batch: pixels (B, 3, H, W) in [-1, 1] and captions -> the weighted loss."""
    device = pixel_values.device
    scheduler = c.noise_scheduler
    vae_loss = None
    with autocast(device, tcfg.mixed_precision):
        if tune_vae:
            vae_loss = vae_reconstruction_loss(c.vae, pixel_values, generator)
        with torch.no_grad():
            latents = encode_latents(c.vae, pixel_values, generator)  # (B, 4, H/8, W/8)
        noise = draw_noise(latents, generator, tcfg.noise_offset)
        bsz = latents.shape[0]
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (bsz,), generator=generator
        ).to(device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prompt_embeds, pooled = encode_text(c, captions, device)  # (B, 77, D), (B, P) | None
        added = None
        if c.kind == "sdxl":
            added = {"text_embeds": pooled, "time_ids": sdxl_time_ids(bsz, resolution, device)}
        pred = c.unet(noisy, timesteps, prompt_embeds, added_cond_kwargs=added, return_dict=False)[0]
        target = target_for(scheduler, latents, noise, timesteps)
        diff_loss = weighted_mse(pred, target, loss_weights(scheduler, timesteps, tcfg.min_snr_gamma))
    loss = diff_loss
    if vae_loss is not None:
        loss = loss + tcfg.vae_loss_weight * vae_loss.float()
    return StepOutput(
        loss=loss,
        diffusion_loss=diff_loss.detach(),
        vae_loss=None if vae_loss is None else vae_loss.detach(),
    )


@torch.no_grad()
def validation_loss(
    c: Components,
    pixel_values: torch.Tensor,
    captions: list[str],
    tcfg: TrainConfig,
    seed: int,
    resolution: int,
) -> float:
    """Diffusion loss on held-out images with noise and timesteps fixed by `seed`, so that
    values at different steps are comparable (only the weights change between them)."""
    g = torch.Generator().manual_seed(seed)
    out = compute_loss(c, pixel_values, captions, tcfg, g, tune_vae=False, resolution=resolution)
    return float(out.diffusion_loss)
