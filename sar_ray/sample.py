"""Generate SAR samples for a fixed prompt list x seeds from a pipeline.

One generation function serves validation samples (a pipeline around the live training
modules) and final samples (a base pipeline with the trial's saved weights loaded through
plain diffusers calls, `load_pipeline`), so the two cannot drift apart.

A sample folder holds single-channel amplitude PNGs (16-bit, [0, 1] -> 0..65535), optional
float32 TIFFs, `metadata.jsonl` (file_name, text = prompt, seed), `grid.png` (rows:
prompts, columns: seeds) and `samples.json`, which tells `sar-ray evaluate` that the folder
is model output (already [0, 1] amplitude: never normalised a second time).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .config import ModelConfig, SampleConfig
from .data.io import write_amplitude_png, write_tiff
from .evaluate import mark_model_output


@dataclass
class SampleSet:
    folder: Path
    images: list[Path]
    grid: Path
    metadata: Path


def load_pipeline(model: ModelConfig, weights: str | Path | None, scheduler: str, device: torch.device | str = "cpu"):
    """Base pipeline from `model.pretrained` with a trial's weights folder loaded on top, the
    same way a user loads them (`load_lora_weights`, `load_textual_inversion`, full folders)."""
    from .checkpoint import load_outputs_into_pipeline
    from .models import assemble_pipeline, load_components

    pipe = assemble_pipeline(load_components(model), scheduler)
    if weights is not None:
        pipe = load_outputs_into_pipeline(pipe, weights)
    return pipe.to(device)


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n] or "prompt"


def _denoise_and_decode(pipe, prompt: str, cfg: SampleConfig, resolution: int, mixed_precision: str) -> np.ndarray:
    """One prompt x every seed -> amplitudes (S, H, W) in [0, 1].

    The pipeline denoises (under the training's autocast, so fp32 trainable modules and bf16
    frozen ones mix as in training) and returns latents; the VAE decodes them outside autocast
    in its own dtype through `diffusion.decode_latents`, the same decode as training. (The
    pipelines upcast only an fp16 VAE, so bf16 latents met an fp32 VAE and failed.)
    """
    from .diffusion import autocast, decode_latents

    device = pipe.unet.device
    gens = [torch.Generator("cpu").manual_seed(s) for s in cfg.seeds]  # the same images on any device
    with autocast(device, mixed_precision):
        latents = pipe(
            prompt=[prompt] * len(cfg.seeds),
            negative_prompt=[cfg.negative_prompt] * len(cfg.seeds) if cfg.negative_prompt else None,
            num_inference_steps=cfg.steps,
            guidance_scale=cfg.guidance_scale,
            height=resolution,
            width=resolution,
            generator=gens,
            output_type="latent",
        ).images  # (S, 4, H/8, W/8)
    images = decode_latents(pipe.vae, latents).float()  # (S, 3, H, W) in [-1, 1]
    return ((images.mean(dim=1) + 1) / 2).clamp(0, 1).cpu().numpy()  # (S, H, W)


@torch.no_grad()
def generate(pipe, cfg: SampleConfig, resolution: int, out_dir: str | Path, device: torch.device | str = "cpu",
             mixed_precision: str = "no") -> SampleSet:
    """Every prompt x seed, one image each; deterministic for a given pipeline and config.
    `mixed_precision`: the training's (`train.mixed_precision`), so that sampling runs the
    modules the way training did."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()  # no dropout (LoRA dropout included) while sampling
    rows: list[list[np.ndarray]] = []
    images: list[Path] = []
    meta_lines = []
    for i, prompt in enumerate(cfg.prompts):
        amps = _denoise_and_decode(pipe, prompt, cfg, resolution, mixed_precision)  # (S, H, W)
        row = []
        for seed, amp in zip(cfg.seeds, amps):
            name = f"{i:02d}-{_slug(prompt)}-seed{seed}"
            path = out / f"{name}.png"
            write_amplitude_png(path, amp)
            if cfg.save_tiff:
                write_tiff(out / f"{name}.tif", amp)
            images.append(path)
            meta_lines.append(json.dumps({"file_name": path.name, "text": prompt, "seed": seed}))
            row.append(amp)
        rows.append(row)
    meta = out / "metadata.jsonl"
    meta.write_text("\n".join(meta_lines) + "\n")
    grid = write_grid(rows, cfg.prompts, cfg.seeds, out / "grid.png")
    mark_model_output(out, images=len(images), resolution=resolution, prompts=list(cfg.prompts),
                      seeds=list(cfg.seeds), scheduler=cfg.scheduler, steps=cfg.steps)
    return SampleSet(out, images, grid, meta)


def write_grid(rows: list[list[np.ndarray]], prompts: list[str], seeds: list[int], path: Path) -> Path:
    """A labelled grid: one row per prompt (label on the left), one column per seed."""
    h, w = rows[0][0].shape
    cell = max(h, 96)  # tiny samples are upscaled so that the grid stays readable
    label_w, head_h = 260, 18
    canvas = Image.new("L", (label_w + cell * len(seeds), head_h + cell * len(rows)), color=255)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for j, seed in enumerate(seeds):
        draw.text((label_w + j * cell + 4, 2), f"seed {seed}", fill=0, font=font)
    for i, (prompt, row) in enumerate(zip(prompts, rows)):
        y = head_h + i * cell
        words, line, lines = prompt.split(), "", []
        for word in words:  # wrap the prompt into the label column
            if len(line) + len(word) + 1 > 38:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        lines.append(line)
        for k, text in enumerate(lines[: cell // 12]):
            draw.text((4, y + 4 + 12 * k), text, fill=0, font=font)
        for j, amp in enumerate(row):
            tile = Image.fromarray((np.clip(amp, 0, 1) * 255).round().astype(np.uint8), mode="L")
            canvas.paste(tile.resize((cell, cell), Image.NEAREST), (label_w + j * cell, y))
    canvas.save(path)
    return path
