"""Benchmark: a training step with and without the latent and text caches, side by side in one run.

    python tests/bench/latent_cache.py [--resolution 256] [--batch-size 2] [--rounds 5] [--steps 3] [--trials 4]

Tiny SDXL (built from constructors, no downloads) on CPU, UNet trained in full, flips on.
Each round times `--steps` steps of each kind, interleaved (so load on the machine hits both
alike): uncached (pixels -> VAE encoder -> latents, captions -> text encoders) and cached (stored
posterior moments -> one draw, `diffusion.sample_cached`; stored text encoder outputs looked up,
`data.cache.TextEmbeddings`). Prints the step times, the cached/uncached ratio per round (median
and spread), and the VAE and text encoder forward calls (forward hooks): trial 1 builds the
caches (one VAE call per image and view, one text call per encoder for the distinct captions),
trials 2..N make none. Goal (issue 9): trials 2..N make
zero encoder calls, step time <= 0.7x. A step must take >= 200 ms here, or the ratio measures
fixed costs: raise --resolution if it does not.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from sar_ray.config import ModelConfig, TrainConfig
    from sar_ray.data.cache import EncoderCalls, TextEmbeddings, TextEncoderCalls, text_table
    from sar_ray.diffusion import Batch, compute_loss, posterior, random_flip
    from sar_ray.models import load_components

    torch.manual_seed(0)
    c = load_components(ModelConfig(pretrained="tiny-sdxl"), keep_fp32={"unet"})
    c.unet.requires_grad_(True).train()
    opt = torch.optim.AdamW(c.unet.parameters(), lr=1e-5)
    tcfg = TrainConfig()
    calls = EncoderCalls(c.vae)
    text_calls = TextEncoderCalls(c.text_encoders)
    g = torch.Generator().manual_seed(0)
    r, b = args.resolution, args.batch_size
    images = torch.rand(args.images, 3, r, r, generator=g) * 2 - 1  # (N, 3, R, R) in [-1, 1]
    captions = ["<SAR> image of open water with a ship"] * args.images

    # Trial 1 builds the cache: each image and its flip through the encoder once.
    with torch.no_grad():
        moments = torch.cat([posterior(c.vae, images[i:i + b]).parameters for i in range(0, args.images, b)])
        moments_flip = torch.cat([posterior(c.vae, images[i:i + b].flip(-1)).parameters
                                  for i in range(0, args.images, b)])
    build_calls = calls.n
    distinct = sorted({"", *captions})
    text_cache = TextEmbeddings(text_table(c, distinct, tcfg.mixed_precision, torch.device("cpu")), torch.device("cpu"))
    text_build_calls = text_calls.n

    def step(i: int, cached: bool) -> None:
        sl = slice((i * b) % args.images, (i * b) % args.images + b)
        batch = (Batch(None, captions[sl], latent_moments=moments[sl], latent_moments_flip=moments_flip[sl],
                       text_cache=text_cache)
                 if cached else Batch(images[sl], captions[sl]))
        batch = random_flip(batch, g)
        out = compute_loss(c, batch, tcfg, g, tune_vae=False, resolution=r)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(0, False), step(0, True)  # warm-up
    times = {False: [], True: []}
    per_trial_calls = {False: [], True: []}
    per_trial_text = {False: [], True: []}
    for rnd in range(args.rounds):
        for cached in (False, True) if rnd % 2 == 0 else (True, False):
            before, text_before = calls.n, text_calls.n
            t0 = time.perf_counter()
            for i in range(args.steps):
                step(i, cached)
            times[cached].append((time.perf_counter() - t0) / args.steps)
            per_trial_calls[cached].append(calls.n - before)
            per_trial_text[cached].append(text_calls.n - text_before)
    ratios = [cc / uc for cc, uc in zip(times[True], times[False])]
    print(f"tiny SDXL, CPU ({args.threads} threads), {r} px, batch {b}, UNet full, flip on; "
          f"{args.rounds} rounds x {args.steps} steps each")
    print(f"uncached step: median {statistics.median(times[False]) * 1e3:.0f} ms "
          f"(min {min(times[False]) * 1e3:.0f}, max {max(times[False]) * 1e3:.0f}); "
          f"VAE encoder calls per {args.steps} steps: {per_trial_calls[False][0]}, "
          f"text encoder calls: {per_trial_text[False][0]}")
    print(f"cached step:   median {statistics.median(times[True]) * 1e3:.0f} ms "
          f"(min {min(times[True]) * 1e3:.0f}, max {max(times[True]) * 1e3:.0f}); "
          f"VAE encoder calls per {args.steps} steps: {per_trial_calls[True][0]}, "
          f"text encoder calls: {per_trial_text[True][0]}")
    print(f"ratio cached/uncached: median {statistics.median(ratios):.2f} "
          f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)})  goal <= 0.70")
    print(f"VAE encoder calls: trial 1 builds the cache with {build_calls} (the {args.images} images and their "
          f"flips, {b} a call); trials 2..{args.trials}: {sum(per_trial_calls[True])} in all; without the cache "
          f"every trial calls it once per step")
    print(f"text encoder calls: trial 1 builds the cache with {text_build_calls} (the {len(distinct)} distinct "
          f"captions, \"\" included, one batch through each of the {len(c.text_encoders)} encoders); trials "
          f"2..{args.trials}: {sum(per_trial_text[True])} in all; without the cache every step calls each encoder once")


if __name__ == "__main__":
    main()
