"""Stable Diffusion 1.x/2.x and SDXL components: load from a hub id or a local folder, or build
tiny random ones from constructors (`tiny-sd15` = `tiny-sd`, `tiny-sd2`, `tiny-sdxl`) for CPU tests
and smoke runs. A tiny model is the public config of its family (shipped in
`sar_ray/model_configs/`) with smaller widths and depths, nothing else changed.

A real model and a tiny one take the same path after loading: `save_pipeline` writes a diffusers
pipeline folder and `load_components` reads it back exactly as it reads a downloaded model.

    c = load_components(cfg.model)                   # Components(kind="sdxl", unet=..., ...)
    prompt_embeds, pooled = encode_text(c, ["<SAR> image of a forest"], device)
    pipe = assemble_pipeline(c, "dpm++")             # wraps the live modules, no copies
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from torch import Tensor, nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from sar_ray import natural
from sar_ray.config import ModelConfig

# The model families whose public configs ship in sar_ray/model_configs/.
FAMILIES = ("sd15", "sd2", "sdxl")
# Tiny random models of each family, built from constructors (`tiny-sd` is `tiny-sd15`).
TINY = {"tiny-sd15": "sd15", "tiny-sd": "sd15", "tiny-sd2": "sd2", "tiny-sdxl": "sdxl"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SAMPLING_SCHEDULERS = {
    # dpm++ (2M): the usual 20-30 step sampler for SD/SDXL.
    "dpm++": lambda config: DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++"),
    "euler": lambda config: EulerDiscreteScheduler.from_config(config),
    "ddim": lambda config: DDIMScheduler.from_config(config),
}
# CLIP's tokenizers cap captions at 77 tokens (positional embeddings of the text encoders).
MAX_TOKENS = 77


@dataclass
class Components:
    """The parts of one SD or SDXL model that training touches."""

    kind: Literal["sd", "sdxl"]
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list[nn.Module]  # SD: [CLIPTextModel]; SDXL: [CLIPTextModel, CLIPTextModelWithProjection]
    tokenizers: list[CLIPTokenizer]  # one per text encoder
    noise_scheduler: DDPMScheduler  # training scheduler (add_noise, targets), from the model's config
    source: str  # what model.pretrained said
    family: str = "sd15"  # sd15 | sd2 | sdxl
    # SDXL: the unconditional embedding is zeros, not the encoding of "" (model_index.json).
    force_zeros_for_empty_prompt: bool = False

    @property
    def text_encoder_names(self) -> list[str]:
        return ["text_encoder", "text_encoder_2"][: len(self.text_encoders)]

    @property
    def tokenizer_names(self) -> list[str]:
        return ["tokenizer", "tokenizer_2"][: len(self.tokenizers)]

    def modules(self) -> dict[str, nn.Module]:
        """{"unet", "vae", "text_encoder"[, "text_encoder_2"]} -> module."""
        out: dict[str, nn.Module] = {"unet": self.unet, "vae": self.vae}
        out.update(zip(self.text_encoder_names, self.text_encoders))
        return out

    def to(self, device: torch.device | str) -> Components:
        for m in self.modules().values():
            m.to(device)
        return self


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------


def _cache_dir() -> Path:
    from .config import cache_home

    return cache_home() / "clip-bpe"


@lru_cache(maxsize=1)
def _clip_bpe_dir() -> Path:
    """vocab.json + merges.txt of OpenAI CLIP's BPE, written once from the file open_clip ships.

    The vocabulary is built the way open_clip's SimpleTokenizer (and OpenAI CLIP) builds it:
    256 byte symbols, the same with `</w>`, one entry per merge, then the two special tokens,
    49408 entries in all, so token ids equal those of `openai/clip-vit-large-patch14`.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    target = _cache_dir()
    if (target / "vocab.json").is_file() and (target / "merges.txt").is_file():
        return target
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError:  # read-only home (some cluster workers): a per-user temp folder instead
        target = Path(tempfile.gettempdir()) / f"sar-ray-clip-bpe-{os.getuid()}"
        target.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # line 0 is a version header
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    # Atomic: concurrent Ray workers may build the cache at once; each writes its own temp file
    # and renames it into place, so no reader ever sees half a file.
    for name, text in (
        ("vocab.json", json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False)),
        ("merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n"),
    ):
        fd, tmp = tempfile.mkstemp(dir=target, prefix=f".{name}.")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # a shared cache: readable by other users' workers
        os.replace(tmp, target / name)
    return target


def clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A fresh CLIP tokenizer with the real 49408-token BPE vocabulary (no download).

    `pad_token="!"` gives SDXL's `tokenizer_2` (OpenCLIP bigG pads with "!", id 0).
    """
    return CLIPTokenizer.from_pretrained(
        str(_clip_bpe_dir()), pad_token=pad_token, model_max_length=MAX_TOKENS, local_files_only=True
    )


# --------------------------------------------------------------------------------------------
# public configs and tiny models
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _public(family: str) -> dict:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; valid: {', '.join(FAMILIES)}")
    return json.loads(resources.files("sar_ray.model_configs").joinpath(f"{family}.json").read_text())


def public_config(family: str, component: str) -> dict:
    """The public config of `component` ("unet", "vae", "text_encoder", "text_encoder_2",
    "tokenizer", "tokenizer_2", "scheduler", "model_index") of SD 1.5, SD 2.1 or SDXL base,
    as shipped in `sar_ray/model_configs/` (annotation keys such as `_source` dropped)."""
    raw = _public(family)
    if component not in raw:
        raise ValueError(f"{family} has no {component}")
    return {k: v for k, v in raw[component].items() if not k.startswith("_")}


# What a tiny model changes in the public configs: widths and depths only. Everything else
# (token ids and pooling, activation, projection, linear projections, upcast flags, scaling
# factor, micro-conditioning type, scheduler, prediction type) stays the real checkpoint's,
# so a test fails where a real model would. Widths are multiples of 32 (norm_num_groups 32).
# The real counts of blocks and layers are depths too, and shrink.
_TINY_TEXT = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
_TINY_VAE = dict(block_out_channels=[32, 32, 32, 32], layers_per_block=1, sample_size=64)
_TINY_TIME_DIM, _TINY_PROJ = 8, 32
# SD 1.x/2.x: one cross-attention level fewer (depth). 64 px images give 8 x 8 latents, and a
# fourth downsampling would leave the mid-block attention one token, where queries and keys
# have no effect (their LoRA would get no gradient).
_TINY_SD_UNET = dict(block_out_channels=[32, 64, 64], layers_per_block=1, cross_attention_dim=32, sample_size=8,
                     down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                     up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])
TINY_SIZES: dict[str, dict[str, dict]] = {
    "sd15": {"unet": _TINY_SD_UNET, "vae": _TINY_VAE, "text_encoder": dict(_TINY_TEXT, projection_dim=_TINY_PROJ)},
    # attention_head_dim is diffusers' legacy name for the number of heads: (5, 10, 20, 20)
    # would not divide these widths.
    "sd2": {"unet": dict(_TINY_SD_UNET, attention_head_dim=[2, 4, 4]), "vae": _TINY_VAE,
            "text_encoder": dict(_TINY_TEXT, projection_dim=_TINY_PROJ)},
    "sdxl": {
        "unet": dict(block_out_channels=[32, 64, 64], attention_head_dim=[2, 4, 4], layers_per_block=1,
                     transformer_layers_per_block=[1, 1, 1], sample_size=8,
                     cross_attention_dim=2 * _TINY_TEXT["hidden_size"],  # both encoders, concatenated
                     addition_time_embed_dim=_TINY_TIME_DIM,
                     # 6 micro-conditioning numbers (original size, crop top-left, target size) + pooled
                     projection_class_embeddings_input_dim=6 * _TINY_TIME_DIM + _TINY_PROJ),
        "vae": _TINY_VAE,
        "text_encoder": dict(_TINY_TEXT, projection_dim=_TINY_PROJ),
        "text_encoder_2": dict(_TINY_TEXT, num_hidden_layers=3, projection_dim=_TINY_PROJ),
    },
}


def tiny_family(name: str) -> str:
    """`tiny-sd15` / `tiny-sd` -> "sd15", `tiny-sd2` -> "sd2", `tiny-sdxl` -> "sdxl"."""
    if name not in TINY:
        raise ValueError(f"unknown tiny model {name!r}; valid: {', '.join(TINY)}")
    return TINY[name]


def _text_config(family: str, name: str, sizes: dict | None) -> CLIPTextConfig:
    return CLIPTextConfig(**{**public_config(family, name), **(sizes or {})})


def _tokenizer(family: str, name: str) -> CLIPTokenizer:
    return clip_tokenizer(pad_token=public_config(family, name)["pad_token"])


def build_tiny(kind: str, seed: int = 0) -> Components:
    """Random tiny components of `kind` (`tiny-sd15`/`sd15`, `tiny-sd`/`sd`, `tiny-sd2`/`sd2`,
    `tiny-sdxl`/`sdxl`), fp32: the public config of that family with `TINY_SIZES` applied.

    Each constructor runs under `torch.manual_seed(seed)`: the same seed gives the same weights.
    """
    name = kind if kind.startswith("tiny-") else f"tiny-{kind}"
    family = tiny_family(name)
    sizes = TINY_SIZES[family]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config({**public_config(family, "unet"), **sizes["unet"]})
    torch.manual_seed(seed)
    vae = AutoencoderKL.from_config({**public_config(family, "vae"), **sizes["vae"]})
    names = ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]
    encoders: list[nn.Module] = []
    for te_name in names:
        torch.manual_seed(seed)
        cls = CLIPTextModelWithProjection if te_name == "text_encoder_2" else CLIPTextModel
        encoders.append(cls(_text_config(family, te_name, sizes[te_name])))
    tokenizers = [_tokenizer(family, te_name.replace("text_encoder", "tokenizer")) for te_name in names]
    for m in [unet, vae, *encoders]:
        m.eval()
    c = Components(
        kind="sdxl" if family == "sdxl" else "sd",
        unet=unet,
        vae=vae,
        text_encoders=encoders,
        tokenizers=tokenizers,
        noise_scheduler=DDPMScheduler.from_config(public_config(family, "scheduler")),
        source=name,
        family=family,
        force_zeros_for_empty_prompt=bool(public_config(family, "model_index").get("force_zeros_for_empty_prompt")),
    )
    # Pooling stays as the public configs have it (eos_token_id 2): a pipeline saved from these
    # components is what the hub serves. `load_components` applies `pool_at_eos`.
    return c


def pool_at_eos(c: Components) -> None:
    """Make every text encoder pool at the tokenizer's `<|endoftext|>`.

    The public SD / SDXL text encoder configs say `eos_token_id: 2` (written before
    transformers#24773); transformers then pools at `argmax(input_ids)`, the largest id in the
    caption. An added token (`<SAR>`, id 49408) is larger than `<|endoftext|>` (49407), so every
    caption with the token would pool at the token: SDXL's pooled `text_embeds` would be the
    same for all captions. Setting the real id makes transformers pool at the first
    `<|endoftext|>`, which is what CLIP means; it changes nothing for captions without added
    tokens, and a saved encoder keeps the fix in its config.
    """
    for te, tok in zip(c.text_encoders, c.tokenizers):
        eos = tok.eos_token_id
        if te.config.eos_token_id == eos:
            continue
        te.config.eos_token_id = eos
        tm = getattr(te, "text_model", te)
        if hasattr(tm, "eos_token_id"):
            tm.eos_token_id = eos


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def detect_kind(model_index: dict) -> Literal["sd", "sdxl"]:
    """SD or SDXL from a pipeline's model_index.json."""
    name = str(model_index.get("_class_name", ""))
    if "text_encoder_2" in model_index or "XL" in name:
        if model_index.get("text_encoder") in (None, [None, None]):
            raise ValueError(
                f"{name or 'this pipeline'} has no first text encoder (an SDXL refiner?); "
                "sar-ray fine-tunes SDXL base models with both text encoders"
            )
        return "sdxl"
    return "sd"


def _module_dtype(name: str, cfg: ModelConfig, keep_fp32: set[str]) -> torch.dtype:
    if name in keep_fp32 or (name == "vae" and cfg.vae_force_upcast):
        return torch.float32
    return DTYPES[cfg.weight_dtype]


def cast_module(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`module.to(dtype)` for floating-point weights, skipped when already there.

    Calls `nn.Module.to` directly: diffusers' `ModelMixin.to` warns on every dtype cast (its
    list of modules to keep in fp32 is empty, not None, for the UNet and VAE).
    """
    tensors = [*module.parameters(), *module.buffers()]
    if all(t.dtype == dtype for t in tensors if t.is_floating_point()):
        return module
    return nn.Module.to(module, dtype)


def _with_prediction_type(scheduler: DDPMScheduler, cfg: ModelConfig) -> DDPMScheduler:
    if cfg.prediction_type and cfg.prediction_type != scheduler.config.prediction_type:
        return DDPMScheduler.from_config(scheduler.config, prediction_type=cfg.prediction_type)
    return scheduler


def load_components(cfg: ModelConfig, keep_fp32: Iterable[str] = (), text_only: bool = False) -> Components:
    """Load the components of `cfg.pretrained`: a hub id, a local pipeline folder, tiny-sd/sdxl,
    or a natural-image tiny base (`tiny-sdxl-natural`: built and cached on first use, then read
    as a local folder).

    Weights are in `cfg.weight_dtype` except the components named in `keep_fp32` (those a
    strategy tunes fully, so they are never rounded through fp16) and the VAE when
    `cfg.vae_force_upcast`. Put modules in train mode yourself; everything loads in eval mode.
    `text_only`: the text encoders and tokenizers alone, exactly as a trial loads them (the
    text-embedding cache); `unet` and `vae` are None (a tiny model is built whole: it is tiny).
    """
    keep = set(keep_fp32)
    if cfg.pretrained in TINY:
        c = build_tiny(cfg.pretrained)
        for name, m in c.modules().items():
            cast_module(m, _module_dtype(name, cfg, keep))
        c.noise_scheduler = _with_prediction_type(c.noise_scheduler, cfg)
        pool_at_eos(c)
        return c

    src = cfg.pretrained
    if natural.is_natural(src):  # built once from skimage's photographs, then a local folder
        src = str(natural.ensure(src))
    local = Path(src).is_dir()
    # A local folder never touches the network; a hub id uses the cache (and HF_HUB_OFFLINE).
    hub: dict = {"revision": cfg.revision}
    if local:
        hub["local_files_only"] = True
    try:
        index = DiffusionPipeline.load_config(src, **hub)
    except Exception as e:  # noqa: BLE001 - many hub/IO errors; the message says what to check
        raise ValueError(
            f"model.pretrained={src!r}: not a diffusers pipeline folder or reachable hub id "
            f"(no model_index.json): {e}"
        ) from e
    kind = detect_kind(index)
    weights = dict(hub, variant=cfg.variant)

    def diffusers_part(cls, name):
        return cls.from_pretrained(src, subfolder=name, torch_dtype=_module_dtype(name, cfg, keep), **weights)

    def transformers_part(cls, name):
        return cls.from_pretrained(src, subfolder=name, dtype=_module_dtype(name, cfg, keep), **weights)

    unet = None if text_only else diffusers_part(UNet2DConditionModel, "unet")
    vae = None if text_only else diffusers_part(AutoencoderKL, "vae")
    encoders: list[nn.Module] = [transformers_part(CLIPTextModel, "text_encoder")]
    tokenizers = [CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **hub)]
    if kind == "sdxl":
        encoders.append(transformers_part(CLIPTextModelWithProjection, "text_encoder_2"))
        tokenizers.append(CLIPTokenizer.from_pretrained(src, subfolder="tokenizer_2", **hub))
    # The training scheduler is DDPM on the model's own betas and prediction type, whatever
    # sampler the pipeline ships with (diffusers' training scripts do the same).
    scheduler = DDPMScheduler.from_pretrained(src, subfolder="scheduler", **hub)
    for m in [unet, vae, *encoders]:
        if m is not None:
            m.eval()
    unet_config = unet.config if unet is not None else UNet2DConditionModel.load_config(src, subfolder="unet", **hub)
    c = Components(
        kind=kind,
        unet=unet,
        vae=vae,
        text_encoders=encoders,
        tokenizers=tokenizers,
        noise_scheduler=_with_prediction_type(scheduler, cfg),
        source=src,
        family=detect_family(kind, unet_config),
        force_zeros_for_empty_prompt=kind == "sdxl" and bool(index.get("force_zeros_for_empty_prompt", True)),
    )
    pool_at_eos(c)
    return c


def detect_family(kind: str, unet_config) -> str:
    """sd15 | sd2 | sdxl. SD 2.x UNets use linear projections in their transformers (for
    OpenCLIP-H states), SD 1.x UNets convolutions; tiny models keep that key."""
    if kind == "sdxl":
        return "sdxl"
    return "sd2" if unet_config.get("use_linear_projection") else "sd15"


# --------------------------------------------------------------------------------------------
# text conditioning
# --------------------------------------------------------------------------------------------


def tokenize(c: Components, captions: list[str]) -> list[Tensor]:
    """Token ids for each tokenizer: [(B, 77)] (SD) or [(B, 77), (B, 77)] (SDXL).

    Cheap and CPU-only: data loaders may call this and hand the ids to `encode_ids`.
    """
    return [
        tok(
            list(captions),
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        for tok in c.tokenizers
    ]


def encode_ids(c: Components, ids: list[Tensor], device: torch.device | str) -> tuple[Tensor, Tensor | None]:
    """Text conditioning from token ids, exactly as the diffusers pipelines compute it.

    SD: (last hidden state (B, 77, D), None). SDXL: (penultimate hidden states of both
    encoders concatenated (B, 77, D1 + D2), pooled text_embeds of encoder 2 (B, P)).
    No `torch.no_grad` here: gradients reach trainable encoders and the learned token; wrap
    the call in `torch.no_grad()` yourself when the text side is frozen.
    """
    if c.kind == "sd":
        (te,) = c.text_encoders
        return te(ids[0].to(device))[0], None
    hidden, pooled = [], None
    for te, x in zip(c.text_encoders, ids):
        out = te(x.to(device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])  # (B, 77, D_i): SDXL conditions on the penultimate layer
        if isinstance(te, CLIPTextModelWithProjection):
            pooled = out.text_embeds  # (B, P)
    return torch.cat(hidden, dim=-1), pooled


def encode_text(c: Components, captions: list[str], device: torch.device | str) -> tuple[Tensor, Tensor | None]:
    """`encode_ids(c, tokenize(c, captions), device)`."""
    return encode_ids(c, tokenize(c, captions), device)


# --------------------------------------------------------------------------------------------
# pipelines
# --------------------------------------------------------------------------------------------


def sampling_scheduler(c: Components, scheduler: str = "dpm++"):
    if scheduler not in SAMPLING_SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; valid: {', '.join(SAMPLING_SCHEDULERS)}")
    return SAMPLING_SCHEDULERS[scheduler](c.noise_scheduler.config)


def assemble_pipeline(c: Components, scheduler: str = "dpm++") -> DiffusionPipeline:
    """A diffusers pipeline around the live modules (no copies): sampling sees trained weights.

    It does not change train/eval mode or device; call `.eval()` on the modules before sampling
    (LoRA dropout) and `pipe.to(device)` if needed.
    """
    sched = sampling_scheduler(c, scheduler)
    if c.kind == "sd":
        pipe = StableDiffusionPipeline(
            vae=c.vae,
            text_encoder=c.text_encoders[0],
            tokenizer=c.tokenizers[0],
            unet=c.unet,
            scheduler=sched,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    else:
        pipe = StableDiffusionXLPipeline(
            vae=c.vae,
            text_encoder=c.text_encoders[0],
            text_encoder_2=c.text_encoders[1],
            tokenizer=c.tokenizers[0],
            tokenizer_2=c.tokenizers[1],
            unet=c.unet,
            scheduler=sched,
            add_watermarker=False,
            force_zeros_for_empty_prompt=c.force_zeros_for_empty_prompt,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _check_plain(c: Components) -> None:
    for name, m in c.modules().items():
        if any("lora_" in n for n, _ in m.named_parameters()):
            raise ValueError(
                f"{name} carries LoRA adapters: save them with checkpoint.save_outputs "
                "(save_pipeline writes plain base models)"
            )
        emb = m.get_input_embeddings() if hasattr(m, "get_input_embeddings") else None
        if emb is not None and type(emb) is not nn.Embedding:
            raise ValueError(
                f"{name} has a learned-token wrapper: call strategies.materialize_token first"
            )


def save_pipeline(c: Components, path: str | os.PathLike) -> Path:
    """Write a diffusers pipeline folder (safetensors only) that `load_components` and
    `DiffusionPipeline.from_pretrained` read. The sampler saved is dpm++ on the model's betas."""
    _check_plain(c)
    path = Path(path)
    assemble_pipeline(c).save_pretrained(path, safe_serialization=True)
    return path
