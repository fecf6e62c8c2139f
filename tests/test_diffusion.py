"""diffusion.py: the step maths where a tiny model and a real one differ in precision, SDXL
micro-conditioning, the unconditional branch and the VAE decoder's loss."""

from __future__ import annotations

import pytest
import torch

from sar_ray import models
from sar_ray.config import ModelConfig, TrainConfig
from sar_ray.diffusion import Batch, compute_loss, conditioning, decode_latents, encode_latents, sdxl_time_ids, speckle_loss

pytestmark = pytest.mark.usefixtures("torch_one_thread")
CAPTIONS = ["<SAR> image of open water with a ship", "<SAR> image of a forest"]


def _pixels(n: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_sdxl_time_ids_carry_each_images_original_size_and_crop():
    b = Batch(_pixels(), CAPTIONS, original_size=torch.tensor([[40, 60], [1024, 2048]]),
              crop_top_left=torch.tensor([[0, 8], [0, 512]]))
    assert sdxl_time_ids(b, 64).tolist() == [[40, 60, 0, 8, 64, 64], [1024, 2048, 0, 512, 64, 64]]
    # an image already at the training size: (R, R, 0, 0, R, R), what sampling asks for
    assert sdxl_time_ids(Batch(_pixels(1), CAPTIONS[:1]), 64).tolist() == [[64, 64, 0, 0, 64, 64]]


def test_upcast_vae_runs_fp32_inside_bf16_autocast():
    """Before the fix the VAE ran inside the step's autocast: an fp32 VAE computed in bf16."""
    vae = models.build_tiny("sdxl").vae
    px = _pixels()
    plain = encode_latents(vae, px, torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = encode_latents(vae, px, torch.Generator().manual_seed(0))
        decoded = decode_latents(vae, inside)
    assert inside.dtype == torch.float32 and torch.equal(plain, inside)
    assert decoded.dtype == torch.float32 and torch.equal(decoded, decode_latents(vae, plain))


def test_bf16_frozen_model_trains_a_step_on_cpu():
    c = models.load_components(ModelConfig(pretrained="tiny-sdxl", weight_dtype="bf16"), keep_fp32={"unet"})
    c.unet.requires_grad_(True)
    out = compute_loss(c, Batch(_pixels(), CAPTIONS), TrainConfig(mixed_precision="bf16"),
                       torch.Generator().manual_seed(0), tune_vae=False, resolution=64)
    out.loss.backward()
    assert torch.isfinite(out.loss) and c.vae.dtype == torch.float32
    assert all(p.grad is not None for p in c.unet.parameters() if p.requires_grad)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_dropped_captions_get_the_samplers_unconditional_embedding(kind):
    """SDXL samples with zeros for the empty prompt (force_zeros_for_empty_prompt): caption
    dropout must train that branch, not the encoding of "" (SD 1.x/2.x use "")."""
    c = models.load_components(ModelConfig(pretrained=f"tiny-{kind}"))
    batch = Batch(_pixels(), CAPTIONS, drop=torch.tensor([True, False]))
    with torch.no_grad():
        emb, added = conditioning(c, batch, 64)
        kept, _ = models.encode_text(c, CAPTIONS[1:], "cpu")
        empty, _ = models.encode_text(c, [""], "cpu")
        pipe = models.assemble_pipeline(c)
        uncond = pipe.encode_prompt(CAPTIONS[0], device="cpu", num_images_per_prompt=1,
                                    do_classifier_free_guidance=True)[1]  # negative_prompt_embeds
    assert torch.equal(emb[1], kept[0])
    if kind == "sdxl":
        assert c.force_zeros_for_empty_prompt
        assert (emb[0] == 0).all() and (added["text_embeds"][0] == 0).all()
        assert added["text_embeds"][1].abs().sum() > 0
    else:
        assert torch.equal(emb[0], empty[0])
    assert torch.allclose(emb[0], uncond[0], atol=1e-6)


def test_speckle_loss_is_zero_on_the_target_and_punishes_smoothing():
    g = torch.Generator().manual_seed(0)
    amp = torch.distributions.Gamma(4.0, 4.0).sample((2, 1, 64, 64)).clamp(max=3) / 3  # 4-look speckle
    x = (amp * 2 - 1).repeat(1, 3, 1, 1)
    blurred = torch.nn.functional.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False)
    noisy = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert speckle_loss(x, x).item() == 0.0
    # smoothing away the speckle costs more than small noise, and relatively more than under
    # the plain pixel L1 that the old VAE loss used
    l1_ratio = (blurred - x).abs().mean() / (noisy - x).abs().mean()
    ratio = speckle_loss(blurred, x) / speckle_loss(noisy, x)
    assert ratio > 1 and ratio > 2 * l1_ratio


# ---------------------------------------------------------------------------------- latent cache


def _moments(vae, px: torch.Tensor) -> torch.Tensor:
    from sar_ray.diffusion import posterior

    with torch.no_grad():
        return posterior(vae, px).parameters  # (B, 2C, h, w): what the cache stores


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_cached_posterior_gives_the_uncached_loss_with_no_encoder_call(kind):
    """The same generator state: the cached draw equals encode_latents' draw, so the loss does."""
    c = models.load_components(ModelConfig(pretrained=f"tiny-{kind}"))
    px, tcfg = _pixels(), TrainConfig(noise_offset=0.05, min_snr_gamma=5.0)
    cached = Batch(None, CAPTIONS, latent_moments=_moments(c.vae, px))
    calls = []
    c.vae.encoder.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        got = compute_loss(c, cached, tcfg, torch.Generator().manual_seed(3), tune_vae=False, resolution=64)
        assert calls == []  # the cached step never ran the encoder
        want = compute_loss(c, Batch(px, CAPTIONS), tcfg, torch.Generator().manual_seed(3), tune_vae=False,
                            resolution=64)
    assert calls == [1]
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    # another generator state: another latent sample (the cache stores no fixed sample)
    other = compute_loss(c, cached, tcfg, torch.Generator().manual_seed(4), tune_vae=False, resolution=64)
    assert not torch.allclose(other.loss, got.loss)


def test_cached_flip_picks_the_flipped_images_posterior_like_pixel_flip():
    from sar_ray.diffusion import random_flip, sample_cached

    vae = models.build_tiny("sdxl").vae
    px = _pixels(8)
    pixel_batch = random_flip(Batch(px.clone(), [""] * 8), torch.Generator().manual_seed(1))
    cached = random_flip(Batch(None, [""] * 8, latent_moments=_moments(vae, px),
                               latent_moments_flip=_moments(vae, px.flip(-1))), torch.Generator().manual_seed(1))
    flipped = [not torch.equal(a, b) for a, b in zip(pixel_batch.pixels, px)]
    assert 0 < sum(flipped) < 8  # a mix, so the test can tell the two views apart
    torch.testing.assert_close(cached.latent_moments, _moments(vae, pixel_batch.pixels))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    torch.testing.assert_close(sample_cached(vae, cached.latent_moments, g1),
                               encode_latents(vae, pixel_batch.pixels, g2))


def test_a_vae_tuning_step_refuses_cached_posteriors():
    c = models.load_components(ModelConfig(pretrained="tiny-sd15"))
    batch = Batch(None, CAPTIONS, latent_moments=_moments(c.vae, _pixels()))
    with pytest.raises(ValueError, match="VAE-tuning"):
        compute_loss(c, batch, TrainConfig(), torch.Generator().manual_seed(0), tune_vae=True, resolution=64)
