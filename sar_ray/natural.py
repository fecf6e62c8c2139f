"""Tiny base models pretrained on natural images: `tiny-sdxl-natural` (and `tiny-sd15-natural`,
`tiny-sd2-natural`), the quickstart's stand-in for a real checkpoint.

A randomly initialised tiny model cannot show what fine-tuning does: its frozen VAE turns
every latent into grey mush (`tests/bench/vae_bound.py`: its reconstructions of SAR are as far
from real SAR as its untuned samples), so no strategy can move. The paper's question is how a
model pretrained on natural images adapts to SAR, so the quickstart asks it of a tiny one: the
tiny random model of the family (`models.build_tiny`) is trained for about two minutes on two
CPU cores on crops of the photographs that ship inside scikit-image (`skimage.data`, no
download), first its VAE (reconstruction), then its UNet (denoising, with one caption per
photograph); the text encoders stay as built. The UNet learns v-prediction (the objective of
SD 2.x 768-v, `prediction_type: v_prediction` in the saved scheduler config, so every trial and
sampler that loads the base uses it): with epsilon-prediction a tiny UNet trained for minutes
cannot predict the noise at high noise levels precisely enough, and its samples keep the seed's
noise (measured on tiny-sdxl: sampled latents with a std of 2.2 where real latents have 1.2, and
no strategy got 25% of the way from the base row to real SAR in the quickstart; with v-prediction
all eight got 38 to 48%). The result is written once as a diffusers
pipeline folder under the user cache and read back through `load_components`' local-folder
path, exactly as a downloaded checkpoint is:

    path = natural.ensure("tiny-sdxl-natural")      # ~/.cache/sar-ray/models/tiny-sdxl-natural-v2

Building is seeded, so every machine that builds it gets the same weights up to floating-point
order; concurrent builders (trials starting together) wait on
one file lock, and a half-written folder is never visible (built in a temporary folder, then
renamed).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

SUFFIX = "-natural"
# Bump when the recipe changes: a cached model of an older recipe is then rebuilt.
# 2: v-prediction (1 was epsilon, whose samples stayed seed noise).
RECIPE_VERSION = 2

# The photographs of skimage.data that ship with the package (no pooch download), with the
# caption each crop of it trains under. Grey ones are replicated to RGB.
PHOTOS = {
    "astronaut": "a photo of an astronaut",
    "brick": "a photo of a brick wall",
    "camera": "a photo of a cameraman",
    "cat": "a photo of a cat",
    "chelsea": "a photo of a cat",
    "clock": "a photo of a clock",
    "coffee": "a photo of a cup of coffee",
    "coins": "a photo of coins",
    "grass": "a photo of grass",
    "gravel": "a photo of gravel",
    "hubble_deep_field": "a photo of galaxies in the night sky",
    "immunohistochemistry": "a microscope image of tissue",
    "moon": "a photo of the surface of the moon",
    "page": "a photo of a page of text",
    "retina": "a photo of a retina",
    "rocket": "a photo of a rocket",
    "text": "a photo of text",
    "cell": "a microscope image of a cell",
}


@dataclass(frozen=True)
class Recipe:
    """How a natural base is trained. The defaults take about two minutes on 2 CPU cores."""

    resolution: int = 64
    vae_steps: int = 500
    vae_lr: float = 1e-3
    unet_steps: int = 300
    unet_lr: float = 1e-3
    batch_size: int = 8
    caption_dropout: float = 0.1
    seed: int = 0
    prediction_type: str = "v_prediction"  # saved in the scheduler config: what trials train


# What `ensure` builds when no recipe is given (tests swap in a short one).
DEFAULT = Recipe()


def is_natural(name: str) -> bool:
    from .models import TINY

    return name.endswith(SUFFIX) and name[: -len(SUFFIX)] in TINY


def base_of(name: str) -> str:
    """`tiny-sdxl-natural` -> `tiny-sdxl`."""
    if not is_natural(name):
        from .models import TINY

        valid = ", ".join(f"{t}{SUFFIX}" for t in TINY)
        raise ValueError(f"unknown natural-image base {name!r}; valid: {valid}")
    return name[: -len(SUFFIX)]


def cache_root() -> Path:
    from .config import cache_home

    return cache_home() / "models"


def cached_path(name: str, recipe: Recipe = Recipe()) -> Path:
    """`<cache>/tiny-sdxl-natural-v2`; another recipe than the default gets its own folder."""
    tail = "" if recipe == Recipe() else "-" + hashlib.sha1(repr(recipe).encode()).hexdigest()[:8]
    return cache_root() / f"{name}-v{RECIPE_VERSION}{tail}"


def _complete(path: Path) -> bool:
    return (path / "model_index.json").is_file() and (path / "sar_ray_natural.json").is_file()


def ensure(name: str, recipe: Recipe | None = None) -> Path:
    """The pipeline folder of natural base `name`, built on first use and cached."""
    recipe = recipe or DEFAULT
    base = base_of(name)
    path = cached_path(name, recipe)
    if _complete(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second builder waits, then finds it built
        if _complete(path):
            return path
        log.warning("building %s: %s pretrained on skimage photographs (once; cached in %s)", name, base, path)
        started = time.monotonic()
        components, info = build(base, recipe)
        from .models import save_pipeline

        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
        try:
            save_pipeline(components, tmp)
            info["build_seconds"] = round(time.monotonic() - started, 1)
            (tmp / "sar_ray_natural.json").write_text(json.dumps(info, indent=2) + "\n")
            if path.exists():  # an incomplete folder left by a killed build
                shutil.rmtree(path)
            tmp.rename(path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.warning("built %s in %.0f s", name, info["build_seconds"])
    return path


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


def _photos(resolution: int) -> list[tuple[np.ndarray, str]]:
    """Every photograph at scales 1, 1/2 and 1/4 (those at least `resolution` on a side), as
    (H, W, 3) float32 in [0, 1] with its caption: crops of a downscaled photo show whole
    objects, crops of the full one their texture."""
    import skimage.data
    from skimage.transform import rescale

    out = []
    for attr, caption in PHOTOS.items():
        img = np.asarray(getattr(skimage.data, attr)()).astype(np.float32) / 255.0
        img = np.repeat(img[..., None], 3, -1) if img.ndim == 2 else img[..., :3]
        for scale in (1.0, 0.5, 0.25):
            im = img if scale == 1.0 else rescale(img, scale, channel_axis=-1, anti_aliasing=True)
            if min(im.shape[:2]) >= resolution:
                out.append((im.astype(np.float32), caption))
    return out


class _Crops:
    """Seeded random crops (with flips, and grey copies: SAR is one channel) in [-1, 1]."""

    def __init__(self, photos: list[tuple[np.ndarray, str]], resolution: int, seed: int):
        self.photos, self.r = photos, resolution
        self.rng = np.random.default_rng(seed)

    def __call__(self, n: int) -> tuple[torch.Tensor, list[str]]:
        pixels, captions = [], []
        for _ in range(n):
            img, caption = self.photos[self.rng.integers(len(self.photos))]
            h, w = img.shape[:2]
            y, x = self.rng.integers(h - self.r + 1), self.rng.integers(w - self.r + 1)
            crop = img[y : y + self.r, x : x + self.r]
            if self.rng.random() < 0.5:
                crop = crop[:, ::-1]
            if self.rng.random() < 0.3:
                crop = np.repeat(crop.mean(-1, keepdims=True), 3, -1)
            pixels.append(crop.transpose(2, 0, 1))
            captions.append(caption)
        return torch.from_numpy(np.ascontiguousarray(np.stack(pixels))) * 2 - 1, captions


def build(base: str, recipe: Recipe = Recipe()):
    """Train the random tiny `base` on natural photographs: (Components, info dict)."""
    from diffusers import DDPMScheduler

    from .models import build_tiny, pool_at_eos

    torch.manual_seed(recipe.seed)
    c = build_tiny(base, seed=recipe.seed)
    c.noise_scheduler = DDPMScheduler.from_config(c.noise_scheduler.config, prediction_type=recipe.prediction_type)
    crops = _Crops(_photos(recipe.resolution), recipe.resolution, recipe.seed)
    vae_loss = _train_vae(c.vae, crops, recipe)
    c.vae.register_to_config(scaling_factor=_scaling_factor(c.vae, crops))
    pool_at_eos(c)  # as load_components will, so the UNet learns the text states it will see
    unet_loss = _train_unet(c, crops, recipe)
    for m in c.modules().values():
        m.eval()
    info = {"base": base, "recipe": recipe.__dict__, "recipe_version": RECIPE_VERSION,
            "vae_final_l1": vae_loss, "unet_final_loss": unet_loss,
            "scaling_factor": c.vae.config.scaling_factor, "prediction_type": recipe.prediction_type,
            "photos": sorted(PHOTOS), "source": "skimage.data"}
    return c, info


def _train_vae(vae, crops: _Crops, recipe: Recipe) -> float:
    """Reconstruction (L1) with a KL weight of 1e-6, as SD's autoencoders, without their patch
    discriminator (`tests/bench/vae_recipe.py`): added for the last 250 of 500 steps (hinge loss,
    SD's adaptive weight, 0.5), it left reconstructions of SAR smoother, not more speckled (mean
    |dx| 0.093 of the scenes' against 0.110 with L1 alone, W 0.071 against 0.069; a spectral L1
    tried before did no better; a local-variance term, `--texture`, left W three times as far).
    An 8x8x4 latent of a 64 px scene cannot hold per-pixel speckle, a shallower VAE that could
    (2x: 32x32x4) still decodes it smooth after this training (|dx| 0.25, `--depths`), and this
    decoder does not learn to invent it in minutes: its reconstructions keep the scenes' layout, their bright targets at 0.67 of the scenes' 99.5th-percentile amplitude,
    and no speckle."""
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr)
    losses: list[float] = []
    for _ in range(recipe.vae_steps):
        x, _ = crops(recipe.batch_size)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = (rec - x).abs().mean() + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    vae.eval()
    return float(np.mean(losses[-50:]))


@torch.no_grad()
def _scaling_factor(vae, crops: _Crops, n: int = 64) -> float:
    """1 / std of the latents, as SD's 0.18215 was found: unit-variance latents for the UNet."""
    x, _ = crops(n)
    return float(1.0 / vae.encode(x).latent_dist.sample().std())


def _train_unet(c, crops: _Crops, recipe: Recipe) -> float:
    from .config import TrainConfig
    from .diffusion import Batch, compute_loss

    tcfg = TrainConfig(min_snr_gamma=5.0)
    c.unet.train()
    opt = torch.optim.AdamW(c.unet.parameters(), lr=recipe.unet_lr)
    gen = torch.Generator().manual_seed(recipe.seed)
    losses: list[float] = []
    for _ in range(recipe.unet_steps):
        x, captions = crops(recipe.batch_size)
        drop = torch.rand(len(captions), generator=gen) < recipe.caption_dropout
        batch = Batch(pixels=x, captions=captions, drop=drop)
        out = compute_loss(c, batch, tcfg, gen, tune_vae=False, resolution=recipe.resolution)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    c.unet.eval()
    return float(np.mean(losses[-50:]))
