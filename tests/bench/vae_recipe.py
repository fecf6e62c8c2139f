"""Can the natural base's VAE learn to give SAR speckle? Its training loss, side by side.

    python tests/bench/vae_recipe.py [--steps 500] [--gan-start 250] [--gan-weight 0.5]
    python tests/bench/vae_recipe.py --depths 4 3 2     # L1 alone, VAE downsampling 8x, 4x, 2x
    python tests/bench/vae_recipe.py --texture 0.5 2    # L1 + a local-variance (roughness) term
    python tests/bench/vae_recipe.py --texture 2 --grain 0.6 --local-mean 0 4   # + film grain on the photos
    python tests/bench/vae_recipe.py --texture 2 --grain 0.6 --exposure 1.5 --brighten 0.7 --local-mean 4 \
        --kind std --seeds 0 1 2                                               # across seeds
    python tests/bench/vae_recipe.py --recipe --seeds 0 1 2                   # the natural base's VAE

Trains the random tiny-sdxl VAE on the skimage crops (`natural._Crops`, the natural base's
recipe) once with L1 alone (today's recipe) and once with SD's patch discriminator added from
`--gan-start` (hinge loss, SD's adaptive weight on the decoder's last layer), then reconstructs
held-out synthetic SAR scenes (the quickstart's data) from their posterior means and prints,
per loss: W (amplitude Wasserstein to a reference set; the scenes themselves: W_held), the
mean |dx| of the reconstructions over the scenes' (1: as much pixel-to-pixel variation, i.e.
speckle), and their 99.5th percentile over the scenes' (bright targets). Measured 2026-12-03 on
2 loaded cores, 500 steps: L1 W 0.069, |dx| 0.110, p99.5 0.67; + GAN W 0.071, |dx| 0.093,
p99.5 0.64; W_held 0.018 (~5 min a loss at 1 thread).

`--depths` asks whether a shallower VAE (fewer down blocks: a latent of 16 x 16 or 32 x 32 for
64 px, the latter as many numbers as grey pixels) keeps speckle. Measured 2026-12-05, 500 steps,
two runs side by side on 2 cores: 3 blocks (4x) |dx| 0.157, lag-1 correlation of the
reconstructions 0.97 (the scenes': 0.39), W 0.047, 153 s; 2 blocks (2x) |dx| 0.253, lag-1 0.94,
W 0.072, 221 s. Even a latent that could hold every pixel is decoded smooth after a natural-image
training of this length, and the 2x latent makes every UNet step 3.8x dearer (166 ms against
44 ms at batch 4, 1 thread): no depth gives the quickstart speckle in its budget.

`--texture` adds the tuned SAR decoder's roughness term (`diffusion.speckle_loss`: L1 between
5 x 5 local variances, over their mean) to the photographs' L1, as SD's perceptual and GAN
terms keep texture. Measured 2026-12-07, 500 steps, two runs side by side on 2 cores: 0.5 |dx|
0.166, lag-1 0.96, W 0.217; 2.0 |dx| 0.159, lag-1 0.80, W 0.252 (~210 s each). Barely rougher,
and three times as far from the amplitude distribution as L1 alone: texture learned on
photographs does not transfer to speckle. (Tuning the decoder on SAR, `strategy.vae.mode=full`,
does make it rough, but in a quickstart trial of 300 steps at `strategy.vae.lr=2e-3` its
samples came out streaky and brighter: |dx| 1.1x the scenes', lag-1 0.60, and `sar-ray evaluate
--metrics stats` against the 200 scenes gave stats/wasserstein 0.173 [0.133, 0.208] against the
frozen VAE's 0.138 [0.097, 0.173].)

`--grain S` puts film grain on each photograph (multiplicative and mean-preserving, a random
strength up to S per crop: exp(s n - s^2 / 2)), so that the roughness term has texture to teach
that the latent cannot hold and the decoder must invent; `--local-mean M` adds L1 between 4 x 4
means, so invented texture must keep each area's brightness. Measured 2026-12-07, 500 steps, one
run at a time beside CI on 2 cores (~200 s each; "mean" is the reconstructions' over the
scenes'):

    texture  grain             local mean   W      |dx|   lag-1  mean
    0        -                 -            0.029  0.15   0.96   0.92   (L1 alone, today)
    1.0      0.3 (shot noise)  -            0.221  0.32   0.84   -
    0.3      0.6 (shot noise)  -            0.126  0.62   0.64   1.34
    2.0      0.6 (shot noise)  -            0.217  0.65   0.30   1.63
    1.0      0.6               -            0.190  0.44   0.72   1.51
    2.0      0.6               1.0          0.195  0.88   0.45   1.60
    2.0      0.6               4.0          0.114  0.62   0.79   1.31

(shot noise: additive, std s sqrt(brightness), clipped.) Grain is the first recipe whose
decoder invents speckle-like texture on SAR (|dx| up to 0.88 of the scenes', lag-1 0.30 to
0.45 against their 0.39), but every such decoder also brightens the scenes by a third or more
(mean 1.3x to 1.6x; L1 alone keeps 0.92), which puts W at four to seven times L1's 0.029 and
would cost the trials' realism more than the texture gives. A mean-preserving recipe (the brightening happens on SAR,
not on the photographs the terms are computed on) is what is still missing before the natural
base can use it.

`--exposure E --brighten B` give each photograph a random exposure exp(U(-E, B)), clipped as
SAR saturates; `--kind` picks the texture term's roughness (5 x 5 variance, std or mean absolute
deviation), `--seeds` trains once per seed (the model's initialisation, the crops and the
noise), and every row also reports |dx| when a posterior sample is decoded instead of its mean.
Measured 2026-12-07 with `--texture 2 --grain 0.6 --exposure 1.5 --brighten 0.7 --local-mean 4`,
two runs side by side beside a CI run (|dx| / lag-1 / W / mean; rough means lag-1 near the
scenes' 0.39):

    steps  kind  seed 0                  seed 1                  seed 2
    500    var   1.01 0.31 0.078 1.19    0.14 0.94 0.123 1.15    0.53 0.58 0.135 1.32
    500    std   0.50 0.71 0.067 1.02    0.40 0.88 0.106 1.26    0.91 0.35 0.075 1.15
    500    mad   0.22 0.94 0.053 1.03    0.38 0.85 0.108 1.32    0.58 0.80 0.076 1.15
    1000   var   0.67 0.46 0.069 0.95    0.16 0.98 0.095 1.25    0.56 0.67 0.103 1.21

A darker exposure keeps the brightness (mean 0.95 to 1.3 against grain alone's 1.3 to 1.6),
but no variant invents speckle for every seed: seed 1 stays smooth with the variance term even
after 1000 steps, and its smooth decoder does not hide texture in the posterior's noise (|dx|
0.144 from a drawn latent against 0.140 from the mean; trained on the mean, `--decode-mean`:
0.25, lag-1 0.95). Which decoders learn to invent texture is decided by the random stream, so
the natural base does not take this recipe: one machine's build would have speckle and
another's, after a different floating-point order, might not.

Why: every row also reports the decoder on held-out photographs with grain of strength 0.3
("grained photos"). Seed 1's smooth SAR decoder above is rough there (|dx| 0.80, lag-1 0.37
against theirs 0.47): it learned the task on photographs, and whether that texture carries over
to SAR scenes is what the seed decides. Out-of-focus photographs (`--defocus 0.4`: Gaussian
blur of sigma 1 to 4 px, smooth areas under the grain as SAR's backscatter under its speckle)
and more grey ones (`--grey 0.7`) did not help (|dx| 0.37 / 0.42 / 0.20 and 0.32 / 0.43 / 0.62
for seeds 1 / 0 / 2). What did is the std term with L1 and the local mean ramped up from 0
(`--l1-ramp N`: texture first, then accuracy) over a longer training; same options, `--kind std`:

    steps  ramp  seed 0                  seed 1                  seed 2
    500    150   0.50 0.79 0.071 1.03    0.70 0.63 0.098 1.27    0.81 0.73 0.097 1.28
    1000   300   0.87 0.61 0.034 0.96    0.74 0.69 0.034 1.03    0.84 0.60 0.058 1.10

The second row is rough for all three seeds (the coarser grain of lag-1 0.6 to 0.7, not yet the
scenes' 0.39), keeps the amplitude distribution almost as well as L1 alone (W 0.034 to 0.058
against 0.029) and the bright targets (p99.5 0.86 to 0.94), at 290 to 330 s a run. `--recipe`
trains `natural.Recipe()`'s own VAE through `natural._train_vae`, as the build does (its own
generator, so the random stream is the build's, not this script's), per `--seeds`.

But |dx| and lag-1 cannot tell speckle from a lattice. A README quickstart on a base built with
that recipe (std term, L1 ramp 300, 1000 VAE steps; `natural.Recipe` fields, not landed) took
435 s in all (build 187 s) and every strategy got 0.30 to 0.61 of the way to real SAR, and the
full-UNet trials' samples had |dx| 0.81 of the scenes' (lag-1 0.70), but they show a regular
checkerboard, the decoder's upsampling pattern, and look alike across prompts and seeds. So
every row now also prints the spectral flatness of the high-pass residual: the scenes' speckle
0.72 to 0.75 (white noise: 0.75), those samples 0.05 to 0.06. The reconstructions already show
it: L1 alone 0.11 (smooth), the ramped row's seed 0 above 0.03 and `--recipe` seed 0 0.04 (|dx|
0.57, lag-1 0.78), so the "rough" decoders of the table draw a lattice. A recipe gives the
quickstart speckle when its reconstructions of the scenes are rough and flat, for every seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def patch_discriminator(ch: int = 32) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, ch, 4, 2, 1), nn.LeakyReLU(0.2),
        nn.Conv2d(ch, ch * 2, 4, 2, 1), nn.GroupNorm(8, ch * 2), nn.LeakyReLU(0.2),
        nn.Conv2d(ch * 2, ch * 4, 4, 1, 1), nn.GroupNorm(8, ch * 4), nn.LeakyReLU(0.2),
        nn.Conv2d(ch * 4, 1, 4, 1, 1),
    )


def local_roughness(a: torch.Tensor, kind: str) -> torch.Tensor:
    """How rough each 5 x 5 area is: its variance, its std, or its mean absolute deviation."""
    from sar_ray.diffusion import _local_variance

    if kind == "var":
        return _local_variance(a)
    if kind == "std":
        return (_local_variance(a) + 1e-4).sqrt()
    mean = F.avg_pool2d(a, 5, stride=1, padding=2, count_include_pad=False)
    return F.avg_pool2d((a - mean).abs(), 5, stride=1, padding=2, count_include_pad=False)


def recipe_vae(seed: int | None):
    """The natural base's own VAE, trained by `natural._train_vae` as `natural.build` does."""
    from sar_ray import models, natural

    recipe = natural.Recipe() if seed is None else dataclasses.replace(natural.Recipe(), seed=seed)
    torch.manual_seed(recipe.seed)
    vae = models.build_tiny("tiny-sdxl", seed=recipe.seed).vae
    natural._train_vae(vae, natural._Crops(natural._photos(recipe.resolution), recipe.resolution, recipe.seed), recipe)
    return vae.eval()


def train_vae(steps: int, gan_start: int | None, gan_weight: float, depth: int = 4, texture: float = 0.0,
              grain: float = 0.0, local_mean: float = 0.0, exposure: float = 0.0, brighten: float = 0.0,
              seed: int | None = None, kind: str = "var", decode_mean: bool = False,
              l1_ramp: int = 0, defocus: float = 0.0, grey: float = 0.0):
    from diffusers import AutoencoderKL

    from torchvision.transforms.functional import gaussian_blur

    from sar_ray import models, natural

    recipe = natural.Recipe()
    if seed is not None:
        recipe = dataclasses.replace(recipe, seed=seed)
    torch.manual_seed(recipe.seed)
    vae = models.build_tiny("tiny-sdxl", seed=recipe.seed).vae
    if depth != len(vae.config.block_out_channels):  # the same VAE with fewer down/up blocks
        torch.manual_seed(recipe.seed)
        vae = AutoencoderKL.from_config({**vae.config, "block_out_channels": [32] * depth,
                                         "down_block_types": ["DownEncoderBlock2D"] * depth,
                                         "up_block_types": ["UpDecoderBlock2D"] * depth})
    crops = natural._Crops(natural._photos(recipe.resolution), recipe.resolution, recipe.seed)
    disc = patch_discriminator()
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=4e-4, betas=(0.5, 0.9))
    last = vae.decoder.conv_out.weight
    vae.train()
    for step in range(steps):
        x, _ = crops(recipe.batch_size)
        if grey:  # more grey photographs than the crops' 30%: SAR is grey
            g = (torch.rand(x.shape[0], 1, 1, 1) < grey).float()
            x = g * x.mean(1, keepdim=True).expand_as(x) + (1 - g) * x
        if defocus:  # some photographs out of focus: smooth areas, as SAR's backscatter under its speckle
            blur = torch.rand(x.shape[0]) < defocus
            if blur.any():
                x = x.clone()
                for i in torch.nonzero(blur).flatten().tolist():
                    sigma = float(1 + 3 * torch.rand(()))
                    x[i] = gaussian_blur(x[i], [int(2 * round(3 * sigma) + 1)] * 2, [sigma, sigma])
        if exposure or brighten:  # a random exposure per photograph, exp(U(-E, B)), clipped as SAR saturates
            gain = torch.exp(torch.rand(x.shape[0], 1, 1, 1) * (exposure + brighten) - exposure)
            x = ((x + 1) / 2 * gain).clamp(0, 1) * 2 - 1
        if grain:  # film grain of a random strength per photograph: mean-preserving, multiplicative
            level = torch.rand(x.shape[0], 1, 1, 1) * grain
            n = torch.randn(x.shape[0], 1, *x.shape[2:])
            x = ((x + 1) / 2 * torch.exp(level * n - level ** 2 / 2)).clamp(0, 1) * 2 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.mean if decode_mean else post.sample()).sample
        l1 = (rec - x).abs().mean()
        ramp = min(1.0, (step + 1) / l1_ramp) if l1_ramp else 1.0  # texture first, then accuracy
        loss = ramp * l1 + 1e-6 * post.kl().mean()
        if texture:  # the tuned SAR decoder's roughness term, here on the photographs' pixels
            lv = local_roughness(x, kind)
            loss = loss + texture * F.l1_loss(local_roughness(rec, kind), lv) / lv.mean().clamp(min=1e-6)
        if local_mean:  # invented texture must keep each 4 x 4 area's brightness
            loss = loss + ramp * local_mean * F.l1_loss(F.avg_pool2d(rec, 4), F.avg_pool2d(x, 4))
        if gan_start is not None and step >= gan_start:
            g = -disc(rec).mean()
            g_rec = torch.autograd.grad(l1, last, retain_graph=True)[0].norm()
            g_gan = torch.autograd.grad(g, last, retain_graph=True)[0].norm()
            loss = loss + gan_weight * (g_rec / (g_gan + 1e-4)).clamp(0, 1e4).detach() * g
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if gan_start is not None and step >= gan_start - 50:  # the discriminator warms up first
            d = F.relu(1 - disc(x)).mean() + F.relu(1 + disc(rec.detach())).mean()
            opt_d.zero_grad(set_to_none=True)
            d.backward()
            opt_d.step()
    return vae.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--gan-start", type=int, default=250)
    ap.add_argument("--gan-weight", type=float, default=0.5)
    ap.add_argument("--depths", type=int, nargs="+", help="compare L1 alone across these VAE block counts")
    ap.add_argument("--texture", type=float, nargs="+", help="compare L1 + these weights x a local-variance term")
    ap.add_argument("--grain", type=float, default=0.0, help="film grain on the photographs, up to this std")
    ap.add_argument("--local-mean", type=float, nargs="+", default=[0.0], help="x L1 between 4 x 4 means")
    ap.add_argument("--exposure", type=float, default=0.0, help="darken each photograph by a random gain down to exp(-E)")
    ap.add_argument("--brighten", type=float, default=0.0, help="... or brighten it by up to exp(B), then clip")
    ap.add_argument("--kind", choices=["var", "std", "mad"], default="var",
                    help="the texture term's roughness: local variance (the SAR decoder's), std, or mean |deviation|")
    ap.add_argument("--decode-mean", action="store_true",
                    help="train the decoder on the posterior mean, which is what it decodes later, not on a sample")
    ap.add_argument("--l1-ramp", type=int, default=0,
                    help="ramp the L1 and local-mean weights up from 0 over this many steps (texture first)")
    ap.add_argument("--defocus", type=float, default=0.0,
                    help="blur this fraction of the photographs (Gaussian, sigma 1-4 px) before exposure and grain")
    ap.add_argument("--grey", type=float, default=0.0, help="make this fraction of the photographs grey (besides the crops' own 30%)")
    ap.add_argument("--recipe", action="store_true", help="natural.Recipe()'s own VAE (what the build trains), per seed")
    ap.add_argument("--seeds", type=int, nargs="+", default=[None], help="train once per seed (default: the recipe's)")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from sar_ray import natural
    from sar_ray.config import NormalizationConfig
    from sar_ray.data.normalize import normalize
    from sar_ray.data.synth import generate_scene, scene_rng
    from sar_ray.metrics.statistics import CDF_BINS, amplitude_histogram, wasserstein_from_histograms

    def scenes(n: int, offset: int) -> np.ndarray:
        return np.stack([normalize(generate_scene(scene_rng(0, offset + i), 64, 4)[0], NormalizationConfig())
                         for i in range(n)]).astype(np.float32)

    def w(a: np.ndarray, b: np.ndarray) -> float:
        return wasserstein_from_histograms(amplitude_histogram(a, CDF_BINS), amplitude_histogram(b, CDF_BINS))

    def dx(a: np.ndarray) -> float:
        return float(np.abs(np.diff(a, axis=-1)).mean())

    def lag1(a: np.ndarray) -> float:
        a = a - a.mean(axis=(-1, -2), keepdims=True)
        return float((a[..., 1:] * a[..., :-1]).mean() / (a * a).mean())

    def flatness(a: np.ndarray) -> float:
        """Spectral flatness of the high-pass residual (minus its 3 x 3 mean): 0.75 for white noise and
        for the scenes' speckle, near 0 for a lattice (the decoder's upsampling pattern)."""
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[:, None]
        r = (t - F.avg_pool2d(t, 3, 1, 1, count_include_pad=False))[:, 0, 4:-4, 4:-4]
        power = torch.fft.rfft2(r - r.mean((-1, -2), keepdim=True)).abs().pow(2).mean(0)[1:, 1:] + 1e-12
        return float(power.log().mean().exp() / power.mean())

    ref, held = scenes(64, 0), scenes(16, 1000)
    print(f"W_held (the scenes themselves) = {w(ref, held):.4f}")
    if args.recipe:
        runs = [("natural.Recipe()", None, 4, 0.0, 0.0)]
    elif args.texture:
        runs = [(f"L1 + {t} x local {args.kind}" + (f", grain {args.grain}" if args.grain else "")
                 + (f", {m} x local mean" if m else ""), None, 4, t, m) for t in args.texture for m in args.local_mean]
        if args.exposure or args.brighten or args.kind != "var":
            print(f"exposure exp(U(-{args.exposure}, {args.brighten})), roughness {args.kind}")
    elif args.depths:
        runs = [(f"L1, {d} blocks ({2 ** (d - 1)}x)", None, d, 0.0, 0.0) for d in args.depths]
    else:
        runs = [("L1", None, 4, 0.0, 0.0),
                (f"L1 + GAN from step {args.gan_start} x {args.gan_weight}", args.gan_start, 4, 0.0, 0.0)]
    print(f"lag-1 correlation of the scenes = {lag1(held):.2f}, spectral flatness {flatness(held):.2f}")
    runs = [(name + (f", seed {seed}" if seed is not None else ""), *rest, seed)
            for name, *rest in runs for seed in args.seeds]
    for name, start, depth, texture, local_mean, seed in runs:
        t0 = time.monotonic()
        if args.recipe:
            vae = recipe_vae(seed)
        else:
            vae = train_vae(args.steps, start, args.gan_weight, depth, texture, args.grain, local_mean, args.exposure,
                            args.brighten, seed, args.kind, args.decode_mean, args.l1_ramp, args.defocus, args.grey)
        with torch.no_grad():
            x = torch.from_numpy(held)[:, None].repeat(1, 3, 1, 1) * 2 - 1
            post = vae.encode(x).latent_dist
            rec = ((vae.decode(post.mean).sample.mean(1).clamp(-1, 1) + 1) / 2).numpy()
            drawn = ((vae.decode(post.sample()).sample.mean(1).clamp(-1, 1) + 1) / 2).numpy()
            latent_std = float(post.std.mean())
            # the training task itself: held-out photographs with grain of strength 0.3
            photos, _ = natural._Crops(natural._photos(64), 64, 1234)(32)
            g = torch.Generator().manual_seed(0)
            photos = ((photos + 1) / 2 * torch.exp(0.3 * torch.randn(32, 1, 64, 64, generator=g) - 0.045)).clamp(0, 1)
            p_rec = ((vae.decode(vae.encode(photos * 2 - 1).latent_dist.mean).sample.clamp(-1, 1) + 1) / 2).numpy()
            photos = photos.numpy()
        print(f"{name:32s} W {w(ref, rec):.4f}  |dx| {dx(rec) / dx(held):.3f}  "
              f"p99.5 {np.percentile(rec, 99.5) / np.percentile(held, 99.5):.2f}  lag-1 {lag1(rec):.2f}  "
              f"flatness {flatness(rec):.2f}  "
              f"mean {rec.mean() / held.mean():.2f}  |dx| of a drawn latent {dx(drawn) / dx(held):.3f}  "
              f"posterior std {latent_std:.3f}  grained photos: |dx| {dx(p_rec) / dx(photos):.2f} "
              f"lag-1 {lag1(p_rec):.2f} (theirs {lag1(photos):.2f})  "
              f"({time.monotonic() - t0:.0f} s)",
              flush=True)


if __name__ == "__main__":
    main()
