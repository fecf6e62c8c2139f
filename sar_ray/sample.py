"""Generate SAR samples for a fixed prompt list x seeds from a pipeline.

One generation function serves validation samples (a pipeline around the live training
modules) and final samples (a base pipeline with the trial's saved weights loaded through
plain diffusers calls, `load_pipeline`), so the two cannot drift apart.

A sample folder holds single-channel amplitude PNGs (16-bit, [0, 1] -> 0..65535), optional
float32 TIFFs, `metadata.jsonl` (file_name, text = prompt, seed), `grid.png` (rows:
prompts, columns: seeds) and `samples.json`, which tells `sar-ray evaluate` that the folder
is model output (already [0, 1] amplitude: never normalised a second time).

Data-parallel sampling: with `world_size` > 1 (a torch.distributed group, as Ray Train
workers have) each rank denoises its share of the prompt x seed rows (`rows[rank::world_size]`)
and rank 0 gathers the amplitudes and writes the folder, the same folder one process writes:
every row is denoised on its own (a batch of one, its own seeded generator), so what a row
gives does not depend on which rows share its batch or how many workers there are.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .config import ModelConfig, NormalizationConfig, SampleConfig
from .data.io import write_amplitude_png, write_tiff
from .evaluate import mark_model_output


@dataclass
class SampleSet:
    folder: Path
    images: list[Path]
    grid: Path
    metadata: Path
    rows_per_rank: list[int] = field(default_factory=list)  # prompt x seed rows each rank denoised
    amplitudes: list[np.ndarray] = field(default_factory=list)  # the images' [0, 1] arrays, in `images` order


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


def _denoise_and_decode(pipe, prompt: str, seeds: list[int], cfg: SampleConfig, resolution: int,
                        mixed_precision: str) -> np.ndarray:
    """One prompt x `seeds` -> amplitudes (S, H, W) in [0, 1].

    The pipeline denoises (under the training's autocast, so fp32 trainable modules and bf16
    frozen ones mix as in training) and returns latents; the VAE decodes them outside autocast
    in its own dtype through `diffusion.decode_latents`, the same decode as training. (The
    pipelines upcast only an fp16 VAE, so bf16 latents met an fp32 VAE and failed.)
    """
    from .diffusion import autocast, decode_latents

    device = pipe.unet.device
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]  # the same images on any device
    with autocast(device, mixed_precision):
        latents = pipe(
            prompt=[prompt] * len(seeds),
            negative_prompt=[cfg.negative_prompt] * len(seeds) if cfg.negative_prompt else None,
            num_inference_steps=cfg.steps,
            guidance_scale=cfg.guidance_scale,
            height=resolution,
            width=resolution,
            generator=gens,
            output_type="latent",
        ).images  # (S, 4, H/8, W/8)
    images = decode_latents(pipe.vae, latents).float()  # (S, 3, H, W) in [-1, 1]
    return ((images.mean(dim=1) + 1) / 2).clamp(0, 1).cpu().numpy()  # (S, H, W)


def sample_rows(cfg: SampleConfig) -> list[tuple[int, int]]:
    """(prompt index, seed index) of every image, prompt-major: the order of the folder."""
    return [(i, j) for i in range(len(cfg.prompts)) for j in range(len(cfg.seeds))]


def _gather_rows(mine: dict[tuple[int, int], np.ndarray], rank: int, world_size: int,
                 device: torch.device | str) -> tuple[dict[tuple[int, int], np.ndarray], list[int]]:
    """Every rank's rows on rank 0 (others get {}), and how many rows each rank gave. float32
    amplitudes travel as they are: the PNG, TIFF and grid rank 0 writes are the ones a single
    process writes."""
    if world_size == 1:
        return mine, [len(mine)]
    import torch.distributed as dist

    if dist.get_backend() == "nccl":  # objects travel as CUDA tensors on the current device: this rank's
        torch.cuda.set_device(torch.device(device))
    parts: list[dict | None] | None = [None] * world_size if rank == 0 else None
    dist.gather_object(mine, parts, dst=0)
    if rank != 0:
        return {}, []
    merged = {k: v for part in parts for k, v in part.items()}
    return merged, [len(part) for part in parts]


@torch.no_grad()
def generate(pipe, cfg: SampleConfig, resolution: int, out_dir: str | Path, device: torch.device | str = "cpu",
             mixed_precision: str = "no", rank: int = 0, world_size: int = 1,
             normalization: NormalizationConfig | None = None) -> SampleSet | None:
    """Every prompt x seed, one image each; deterministic for a given pipeline and config.
    `mixed_precision`: the training's (`train.mixed_precision`), so that sampling runs the
    modules the way training did. `normalization`: the training's (`data.normalization`),
    recorded in samples.json so that `sar-ray evaluate` warns when it normalises the
    reference otherwise. `rank` / `world_size` (a torch.distributed group when > 1):
    this rank denoises rows[rank::world_size]; rank 0 writes the folder and returns it, the
    other ranks return None. Every rank of the group must call it (a collective)."""
    out = Path(out_dir)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()  # no dropout (LoRA dropout included) while sampling
    rows = sample_rows(cfg)
    mine = {(i, j): _denoise_and_decode(pipe, cfg.prompts[i], [cfg.seeds[j]], cfg, resolution, mixed_precision)[0]
            for i, j in rows[rank::world_size]}  # (H, W) each
    amps, per_rank = _gather_rows(mine, rank, world_size, device)
    if rank != 0:
        return None
    return _write_folder(out, cfg, resolution, [[amps[(i, j)] for j in range(len(cfg.seeds))]
                                                for i in range(len(cfg.prompts))], per_rank, normalization)


def _write_folder(out: Path, cfg: SampleConfig, resolution: int, grid_rows: list[list[np.ndarray]],
                  per_rank: list[int], normalization: NormalizationConfig | None = None) -> SampleSet:
    """PNGs (+ TIFFs), metadata.jsonl, grid.png, then the samples.json marker (last: a folder
    that has it is complete)."""
    out.mkdir(parents=True, exist_ok=True)
    images: list[Path] = []
    meta_lines = []
    for i, (prompt, row) in enumerate(zip(cfg.prompts, grid_rows)):
        for seed, amp in zip(cfg.seeds, row):
            name = f"{i:02d}-{_slug(prompt)}-seed{seed}"
            path = out / f"{name}.png"
            write_amplitude_png(path, amp)
            if cfg.save_tiff:
                write_tiff(out / f"{name}.tif", amp)
            images.append(path)
            meta_lines.append(json.dumps({"file_name": path.name, "text": prompt, "seed": seed}))
    meta = out / "metadata.jsonl"
    meta.write_text("\n".join(meta_lines) + "\n")
    grid = write_grid(grid_rows, cfg.prompts, cfg.seeds, out / "grid.png")
    trained = {"normalization": normalization.model_dump(mode="json")} if normalization is not None else {}
    mark_model_output(out, images=len(images), resolution=resolution, prompts=list(cfg.prompts),
                      seeds=list(cfg.seeds), scheduler=cfg.scheduler, steps=cfg.steps, **trained)
    return SampleSet(out, images, grid, meta, per_rank, [amp for row in grid_rows for amp in row])


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
