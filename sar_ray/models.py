"""Stable Diffusion 1.x/2.x and SDXL components: load from a hub id or a local folder, or build
tiny random ones from constructors (`tiny-sd`, `tiny-sdxl`) for CPU tests and smoke runs.

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

from sar_ray.config import ModelConfig

TINY = ("tiny-sd", "tiny-sdxl")
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
    root = os.environ.get("SAR_RAY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sar-ray"
    )
    return Path(root) / "clip-bpe"


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
# tiny models
# --------------------------------------------------------------------------------------------


def _tiny_text_config(num_layers: int, projection_dim: int | None = None) -> CLIPTextConfig:
    kw = dict(projection_dim=projection_dim) if projection_dim else {}
    return CLIPTextConfig(
        vocab_size=49408,  # the real BPE: captions tokenise exactly as with a real model
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=num_layers,
        max_position_embeddings=MAX_TOKENS,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        # The real eos id: pooling picks the first <|endoftext|>, so an added <SAR> token
        # (id 49408, larger than eos) is not mistaken for the end (the legacy eos_token_id=2
        # path takes argmax(input_ids)).
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
        **kw,
    )


def _tiny_vae(scaling_factor: float) -> AutoencoderKL:
    # Four blocks, three downsamplings: vae_scale_factor 8 as in real SD (64 px -> 8x8 latents).
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=64,
        scaling_factor=scaling_factor,
        force_upcast=True,
    )


def _tiny_noise_scheduler() -> DDPMScheduler:
    # SD's training schedule; steps_offset=1 / clip_sample=False as in SD's own scheduler config.
    return DDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        num_train_timesteps=1000,
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )


def build_tiny(kind: str, seed: int = 0) -> Components:
    """Random tiny SD (`sd`/`tiny-sd`) or SDXL (`sdxl`/`tiny-sdxl`) components, fp32.

    Each constructor runs under `torch.manual_seed(seed)`: the same seed gives the same weights.
    """
    kind = kind.removeprefix("tiny-")
    if kind not in ("sd", "sdxl"):
        raise ValueError(f"unknown tiny model kind {kind!r}; valid: tiny-sd, tiny-sdxl")
    unet_common = dict(
        sample_size=8,  # latent side: pipelines default to 8 * 8 = 64 px
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        norm_num_groups=32,
    )
    if kind == "sd":
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(cross_attention_dim=32, **unet_common)
        torch.manual_seed(seed)
        vae = _tiny_vae(0.18215)
        torch.manual_seed(seed)
        encoders: list[nn.Module] = [CLIPTextModel(_tiny_text_config(2))]
        tokenizers = [clip_tokenizer()]
    else:
        time_dim, proj_dim = 8, 32
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            cross_attention_dim=32 + 32,  # both encoders' hidden states, concatenated
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            # 6 micro-conditioning numbers (original size, crop top-left, target size) + pooled
            projection_class_embeddings_input_dim=6 * time_dim + proj_dim,
            **unet_common,
        )
        torch.manual_seed(seed)
        vae = _tiny_vae(0.13025)
        torch.manual_seed(seed)
        te1 = CLIPTextModel(_tiny_text_config(2))
        torch.manual_seed(seed)
        te2 = CLIPTextModelWithProjection(_tiny_text_config(3, projection_dim=proj_dim))
        encoders = [te1, te2]
        tokenizers = [clip_tokenizer(), clip_tokenizer(pad_token="!")]
    for m in [unet, vae, *encoders]:
        m.eval()
    return Components(
        kind=kind,
        unet=unet,
        vae=vae,
        text_encoders=encoders,
        tokenizers=tokenizers,
        noise_scheduler=_tiny_noise_scheduler(),
        source=f"tiny-{kind}",
    )


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


def load_components(cfg: ModelConfig, keep_fp32: Iterable[str] = ()) -> Components:
    """Load the components of `cfg.pretrained`: a hub id, a local pipeline folder, or tiny-sd/sdxl.

    Weights are in `cfg.weight_dtype` except the components named in `keep_fp32` (those a
    strategy tunes fully, so they are never rounded through fp16) and the VAE when
    `cfg.vae_force_upcast`. Put modules in train mode yourself; everything loads in eval mode.
    """
    keep = set(keep_fp32)
    if cfg.pretrained in TINY:
        c = build_tiny(cfg.pretrained)
        for name, m in c.modules().items():
            cast_module(m, _module_dtype(name, cfg, keep))
        c.noise_scheduler = _with_prediction_type(c.noise_scheduler, cfg)
        return c

    src = cfg.pretrained
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

    unet = diffusers_part(UNet2DConditionModel, "unet")
    vae = diffusers_part(AutoencoderKL, "vae")
    encoders: list[nn.Module] = [transformers_part(CLIPTextModel, "text_encoder")]
    tokenizers = [CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **hub)]
    if kind == "sdxl":
        encoders.append(transformers_part(CLIPTextModelWithProjection, "text_encoder_2"))
        tokenizers.append(CLIPTokenizer.from_pretrained(src, subfolder="tokenizer_2", **hub))
    # The training scheduler is DDPM on the model's own betas and prediction type, whatever
    # sampler the pipeline ships with (diffusers' training scripts do the same).
    scheduler = DDPMScheduler.from_pretrained(src, subfolder="scheduler", **hub)
    for m in [unet, vae, *encoders]:
        m.eval()
    return Components(
        kind=kind,
        unet=unet,
        vae=vae,
        text_encoders=encoders,
        tokenizers=tokenizers,
        noise_scheduler=_with_prediction_type(scheduler, cfg),
        source=src,
    )


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
