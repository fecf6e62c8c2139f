"""Pure step maths of latent diffusion training: latents, noise, targets, weighted loss.

Follows diffusers' train_text_to_image(_sdxl).py: latent scale from `vae.config.scaling_factor`,
the target from the scheduler's `prediction_type`, min-SNR-gamma weights, offset noise, SDXL
micro-conditioning through `added_cond_kwargs` (per image: true original size and crop). The
VAE runs outside autocast in its own dtype; a tuned VAE trains its decoder on the frozen
encoder's latents with a speckle-preserving loss (`speckle_loss`). Every random draw comes from one explicit
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
class Batch:
    """One micro-batch as the step sees it."""

    pixels: torch.Tensor | None  # (B, 3, R, R) in [-1, 1]; None when the latent cache feeds the step
    captions: list[str]
    # SDXL micro-conditioning (Podell et al. 2023): each image's size before resizing and the
    # top-left corner of its crop in the resized image, (B, 2) as (h, w) and (top, left).
    # None: the image was already R x R (original = target size, no crop).
    original_size: torch.Tensor | None = None
    crop_top_left: torch.Tensor | None = None
    # (B,) bool: caption dropped (an unconditional example for classifier-free guidance).
    drop: torch.Tensor | None = None
    # The latent cache (`data.cache`): the frozen encoder's posterior moments, mean and
    # log-variance concatenated on the channel axis as diffusers' DiagonalGaussianDistribution
    # takes them, (B, 2C, R/8, R/8); `_flip` the same of the horizontally flipped image (the VAE
    # is not flip-equivariant, so a flip of the latent would be a different sample).
    latent_moments: torch.Tensor | None = None
    latent_moments_flip: torch.Tensor | None = None
    # The text-embedding cache (`data.cache`, a `data.cache.TextEmbeddings`): the frozen text
    # encoders' output per caption, looked up instead of running them. None: encode.
    text_cache: object | None = None

    @property
    def size(self) -> int:
        return len(self.captions)

    @property
    def device(self) -> torch.device:
        return (self.pixels if self.pixels is not None else self.latent_moments).device


def random_flip(batch: Batch, generator: torch.Generator) -> Batch:
    """Each image flipped horizontally with probability 1/2, drawn from `generator`: the pixels,
    or (cached) the posterior of the flipped image. One draw of (B,) either way, so a cached and
    an uncached step consume the generator alike and pick the same images."""
    flip = torch.rand(batch.size, generator=generator, device=generator.device) < 0.5
    if batch.pixels is not None:
        batch.pixels = torch.where(flip[:, None, None, None].to(batch.device), batch.pixels.flip(-1), batch.pixels)
    if batch.latent_moments is not None:
        if batch.latent_moments_flip is None:
            raise ValueError("data.flip is on but the latent cache holds no flipped posteriors (built without flip)")
        batch.latent_moments = torch.where(flip[:, None, None, None].to(batch.device), batch.latent_moments_flip,
                                           batch.latent_moments)
        batch.latent_moments_flip = None
    return batch


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


def vae_precision(vae, device: torch.device):
    """The VAE runs in its own dtype, outside autocast: an upcast (fp32) VAE must not be cast
    back down to bf16/fp16 by the surrounding autocast (SDXL's VAE overflows in fp16)."""
    return torch.autocast(device_type=device.type, enabled=False)


def sdxl_time_ids(batch: Batch, resolution: int) -> torch.Tensor:
    """SDXL micro-conditioning: (original h, w, crop top, left, target h, w) per image; (B, 6).

    As diffusers' train_text_to_image_sdxl.py: the size before resizing and the crop corner in
    the resized image, so that the model learns what an upscaled chip or an off-centre crop
    looks like (and sampling with (R, R, 0, 0, R, R) asks for a sharp, centred full image).
    """
    b, device = batch.size, batch.device
    original = batch.original_size if batch.original_size is not None else torch.full((b, 2), float(resolution))
    crop = batch.crop_top_left if batch.crop_top_left is not None else torch.zeros(b, 2)
    target = torch.full((b, 2), float(resolution))
    return torch.cat([original.float(), crop.float(), target], dim=1).to(device)  # (B, 6)


def posterior(vae, pixel_values: torch.Tensor):
    """The VAE encoder's diagonal Gaussian over latents for images (B, 3, H, W) in [-1, 1]."""
    # The encoder's own dtype: a tuned decoder is fp32 while a frozen encoder may be bf16.
    with vae_precision(vae, pixel_values.device):
        return vae.encode(pixel_values.to(vae.encoder.conv_in.weight.dtype)).latent_dist


def encode_latents(vae, pixel_values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/f, W/f), one posterior draw."""
    z = posterior(vae, pixel_values).sample(generator=generator)
    # The scale comes from the model's own config (0.18215 SD, 0.13025 SDXL), never hard-coded.
    return z.float() * vae.config.scaling_factor


def sample_cached(vae, moments: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Cached posterior moments (B, 2C, h, w) -> scaled latents, one draw: the same
    distribution and code as `encode_latents` (given the same generator state, the same latents),
    with no encoder call. The moments are cast to the encoder's dtype, where the uncached draw lives."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    dist = DiagonalGaussianDistribution(moments.to(vae.encoder.conv_in.weight.dtype))
    return dist.sample(generator=generator).float() * vae.config.scaling_factor


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents (B, C, h, w) -> images (B, 3, H, W) in [-1, 1], in the VAE's dtype and
    outside autocast (the one decode path of training and sampling)."""
    with vae_precision(vae, latents.device):
        z = latents.to(vae.post_quant_conv.weight.dtype) / vae.config.scaling_factor
        return vae.decode(z).sample


def _amplitude(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] model images (B, 3, H, W) -> SAR amplitude in [0, 1], (B, 1, H, W)."""
    return ((x.float().mean(dim=1, keepdim=True) + 1) / 2).clamp(0, 1)


def _local_variance(a: torch.Tensor, window: int = 5) -> torch.Tensor:
    mean = F.avg_pool2d(a, window, stride=1, padding=window // 2, count_include_pad=False)
    mean_sq = F.avg_pool2d(a * a, window, stride=1, padding=window // 2, count_include_pad=False)
    return (mean_sq - mean * mean).clamp(min=0)


def speckle_loss(recon: torch.Tensor, target: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """What a tuned VAE decoder learns from: L1 on log-amplitude plus L1 on the local variance.

    Plain L1 on pixels rewards the conditional median: a decoder trained on it smooths away
    the speckle, the very statistic the study scores. In log-amplitude, multiplicative
    speckle becomes additive and dark areas (water, shadow) weigh as much as bright ones; the
    local-variance term (5 x 5 windows) asks the decoder to reproduce how rough each area is.
    """
    a_rec, a = _amplitude(recon), _amplitude(target)
    log_term = F.l1_loss(torch.log(a_rec + eps), torch.log(a + eps))
    var_term = F.l1_loss(_local_variance(a_rec), _local_variance(a)) / max(float(_local_variance(a).mean()), 1e-6)
    return log_term + 0.5 * var_term


def draw_noise(latents: torch.Tensor, generator: torch.Generator, noise_offset: float) -> torch.Tensor:
    # Drawn where the generator lives: the training loop keeps it on the device (no host
    # round trip per step); validation passes a CPU generator and moves the draw.
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype,
                        device=generator.device).to(latents.device)
    if noise_offset > 0:
        # Offset noise (Guttenberg 2023): lets the model learn very dark/bright images, which
        # matters for SAR, where water and radar shadow are near zero amplitude.
        offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator, device=generator.device)
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


def conditioning(c: Components, batch: Batch, resolution: int) -> tuple[torch.Tensor, dict | None]:
    """Text conditioning of a batch: (prompt_embeds (B, 77, D), SDXL added_cond_kwargs | None).

    Dropped captions become the unconditional embedding the model's sampler uses: zeros for
    SDXL (`force_zeros_for_empty_prompt`), the encoding of "" for SD 1.x/2.x; training on any
    other "empty" would teach classifier-free guidance a different unconditional branch.
    With the text cache (`batch.text_cache`) the same tensors are looked up, not computed.
    """
    device = batch.device
    zeros = c.force_zeros_for_empty_prompt and batch.drop is not None
    captions = batch.captions
    if batch.drop is not None and not zeros:
        captions = [("" if d else t) for t, d in zip(captions, batch.drop.tolist())]
    if batch.text_cache is not None:  # frozen encoders, no learned token: computed once ahead
        prompt_embeds, pooled = batch.text_cache.lookup(captions, device, c)
    else:
        prompt_embeds, pooled = encode_text(c, captions, device)  # (B, 77, D), (B, P) | None
    if zeros:
        keep = (~batch.drop).to(device)
        prompt_embeds = prompt_embeds * keep[:, None, None].to(prompt_embeds.dtype)
        pooled = pooled * keep[:, None].to(pooled.dtype) if pooled is not None else None
    added = None
    if c.kind == "sdxl":
        added = {"text_embeds": pooled, "time_ids": sdxl_time_ids(batch, resolution)}
    return prompt_embeds, added


def compute_loss(
    c: Components,
    batch: Batch,
    tcfg: TrainConfig,
    generator: torch.Generator,
    tune_vae: bool,
    resolution: int,
) -> StepOutput:
    """One micro-batch -> the weighted diffusion loss (+ the VAE decoder's loss when tuned)."""
    device = batch.device
    scheduler = c.noise_scheduler
    # Latents: one posterior draw of the frozen encoder, outside autocast in the VAE's dtype.
    # The UNet learns on them, and a tuned decoder reconstructs from the same draw. With the
    # latent cache the posterior was computed once ahead (data.cache): only the draw is new.
    with torch.no_grad():
        if batch.latent_moments is not None:
            if tune_vae:  # the decoder learns against pixels, which a cached batch does not carry
                raise ValueError("a VAE-tuning trial cannot read the latent cache (it trains against pixels)")
            latents = sample_cached(c.vae, batch.latent_moments, generator)  # (B, 4, H/8, W/8)
        else:
            latents = encode_latents(c.vae, batch.pixels, generator)  # (B, 4, H/8, W/8)
    vae_loss = None
    if tune_vae:
        vae_loss = speckle_loss(decode_latents(c.vae, latents), batch.pixels)
    with autocast(device, tcfg.mixed_precision):
        noise = draw_noise(latents, generator, tcfg.noise_offset)
        bsz = latents.shape[0]
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (bsz,), generator=generator, device=generator.device
        ).to(device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prompt_embeds, added = conditioning(c, batch, resolution)
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
def validation_loss(c: Components, batch: Batch, tcfg: TrainConfig, seed: int, resolution: int) -> float:
    """Diffusion loss on held-out images with noise and timesteps fixed by `seed`, so that
    values at different steps are comparable (only the weights change between them)."""
    g = torch.Generator().manual_seed(seed)
    out = compute_loss(c, batch, tcfg, g, tune_vae=False, resolution=resolution)
    return float(out.diffusion_loss)
