"""SAR-CLIP: an open_clip model fine-tuned on SAR image-caption pairs, and the metrics it gives.

    result = train_clip("data/train", "runs/sarclip")          # tiny ViT from random init
    clip = load_clip("runs/sarclip")
    img = clip.encode_images(images01)                          # (N, D) unit vectors
    txt = clip.encode_texts(["image of a forest", ...])        # (T, D) unit vectors
    clip_scores(img, txt[prompt_index])                         # 100 * max(cos, 0) per image

A saved model is open_clip's own ``local-dir`` layout (``open_clip_config.json`` +
``open_clip_model.safetensors``): ``open_clip.create_model("local-dir:runs/sarclip")`` loads
it without sar-ray. The config's ``sar_ray`` section records how it was trained.

SAR images are single-channel amplitudes in [0, 1] (normalised as for training); the model
sees them resized to its image size, repeated to three channels and standardised with the
model's mean/std. The ``<SAR>`` caption prefix is removed before tokenising, in training and
in scoring: the evaluator should judge the content of a prompt, not the study's marker token.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sar_ray.config import NormalizationConfig, SynthConfig, text_columns
from sar_ray.metrics import DEFAULT_PREFIX, caption_for_clip

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"

#: Small configurations built in code (no download). `tiny` trains on a CPU in seconds.
ARCHS: dict[str, dict] = {
    "tiny": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        # The real BPE vocabulary and context length, so any caption tokenises as in full CLIP.
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
    "small": {
        "embed_dim": 256,
        "vision_cfg": {"image_size": 64, "layers": 6, "width": 256, "head_width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 6},
    },
}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipError(ValueError):
    """A SAR-CLIP model or training input that cannot be used (names the path and the fix)."""


# ------------------------------------------------------------------------------- model


def model_config(arch: str) -> dict:
    """open_clip model config of `arch`: one of :data:`ARCHS` or any open_clip built-in name."""
    if arch in ARCHS:
        return copy.deepcopy(ARCHS[arch])
    import open_clip

    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ClipError(
            f"unknown CLIP architecture {arch!r}; use one of {', '.join(ARCHS)} or an open_clip "
            f"model name such as ViT-B-32 (open_clip.list_models())"
        )
    return copy.deepcopy(cfg)


def _preprocess_cfg(model_cfg: dict) -> dict:
    size = model_cfg["vision_cfg"].get("image_size", 224)
    size = size if isinstance(size, int) else int(size[0])
    pp = model_cfg.get("preprocess_cfg", {})
    return {
        "size": size,
        "mean": list(pp.get("mean", OPENAI_MEAN)),
        "std": list(pp.get("std", OPENAI_STD)),
        "interpolation": "bilinear",
        "resize_mode": "squash",
    }


def build_clip(arch: str = "tiny", pretrained: str | os.PathLike | None = None, seed: int = 0) -> torch.nn.Module:
    """A new open_clip model of `arch`: random init under `seed`, or weights from a local file.

    `pretrained`: a ``.safetensors`` / ``.pt`` / ``.bin`` file, or a folder holding one (such
    as a saved SAR-CLIP). Never downloads anything.
    """
    import open_clip

    cfg = model_config(arch)
    torch.manual_seed(seed)
    if arch in ARCHS:
        model = open_clip.CLIP(**cfg)
    else:
        model = open_clip.create_model(arch, pretrained=None, pretrained_text=False, pretrained_image=False)
    if pretrained is not None:
        path = _weights_file(Path(pretrained))
        try:
            open_clip.load_checkpoint(model, str(path))
        except Exception as e:  # noqa: BLE001 - shape mismatches, pickles, corrupt files
            raise ClipError(f"{path}: cannot load into a {arch!r} model ({type(e).__name__}: {e})") from None
    return model


def _weights_file(p: Path) -> Path:
    if p.is_dir():
        found = sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")) + sorted(p.glob("*.pt*"))
        if not found:
            raise ClipError(f"{p}: no weights file (.safetensors, .bin, .pt) in this folder")
        return found[0]
    if not p.is_file():
        raise ClipError(f"{p}: pretrained weights not found; give a local weights file or folder")
    return p


def save_clip(model: torch.nn.Module, out: str | os.PathLike, arch: str, extra: dict | None = None) -> Path:
    """Write `model` as an open_clip local-dir folder; returns the folder."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model_config(arch)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_NAME))
    meta = {"model_cfg": cfg, "preprocess_cfg": _preprocess_cfg(cfg), "sar_ray": {"arch": arch, **(extra or {})}}
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
    return out


class SarClip:
    """A loaded SAR-CLIP: encodes [0, 1] SAR images and captions into unit vectors."""

    def __init__(self, model: torch.nn.Module, tokenizer, preprocess: dict, device: str = "cpu",
                 strip_prefix: str | None = DEFAULT_PREFIX, info: dict | None = None):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.image_size = int(preprocess["size"])
        self.mean = torch.tensor(preprocess["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(preprocess["std"], dtype=torch.float32).view(1, 3, 1, 1)
        self.device = device
        self.strip_prefix = strip_prefix
        self.info = info or {}

    def pixels(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(N, H, W) [0, 1] images -> (N, 3, S, S) standardised model input (on the device)."""
        return to_clip_input(images, self.image_size, self.mean, self.std).to(self.device)

    @torch.no_grad()
    def encode_images(self, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> np.ndarray:
        """(N, H, W) [0, 1] images (any size: resized) -> (N, D) float32 unit vectors."""
        out = []
        for i in range(0, len(images), batch_size):
            feats = self.model.encode_image(self.pixels(images[i : i + batch_size]))
            out.append(F.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Captions -> (T, D) float32 unit vectors (the <SAR> prefix removed first)."""
        out = []
        texts = [caption_for_clip(t, self.strip_prefix) for t in texts]
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(texts[i : i + batch_size]).to(self.device)
            out.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def load_clip(path: str | os.PathLike, device: str | None = None) -> SarClip:
    """Load a SAR-CLIP folder written by :func:`train_clip` (or any open_clip local-dir)."""
    import open_clip

    p = Path(path).expanduser().absolute()
    cfg_path = p / CONFIG_NAME
    if not cfg_path.is_file():
        raise ClipError(f"{p}: not a SAR-CLIP folder (no {CONFIG_NAME}); train one with `sar-ray clip train`")
    try:
        meta = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise ClipError(f"{cfg_path}: not valid JSON ({e})") from None
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")) and not any(p.glob("*.pt*")):
        raise ClipError(f"{p}: no weights next to {CONFIG_NAME}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = open_clip.create_model(f"local-dir:{p}", device="cpu")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{p}")
    info = meta.get("sar_ray", {})
    preprocess = meta.get("preprocess_cfg") or _preprocess_cfg(meta["model_cfg"])
    return SarClip(model, tokenizer, preprocess, device, info.get("strip_prefix", DEFAULT_PREFIX), info)


def to_clip_input(images, size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(N, H, W) [0, 1] grayscale -> (N, 3, size, size) standardised float32 (CPU)."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float32) if not torch.is_tensor(images) else images)
    x = x.float()
    if x.ndim == 2:
        x = x[None]
    x = x[:, None]  # (N, 1, H, W)
    if tuple(x.shape[-2:]) != (size, size):
        # antialias: downsizing speckle without it aliases texture into the features
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    x = x.clamp(0, 1).expand(-1, 3, -1, -1)
    return (x - mean) / std


# ------------------------------------------------------------------------------- metrics


def clip_scores(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """CLIP score of each (image, its prompt) pair: 100 * max(cos, 0), as torchmetrics' CLIPScore.

    `image_emb`, `text_emb`: (N, D) unit vectors, row i of one paired with row i of the other.
    """
    cos = np.sum(np.asarray(image_emb, np.float64) * np.asarray(text_emb, np.float64), axis=1)
    return 100.0 * np.maximum(cos, 0.0)


def retrieval_hits(image_emb: np.ndarray, prompt_emb: np.ndarray, prompt_index: np.ndarray) -> np.ndarray:
    """Whether each image's most similar prompt (among the distinct `prompt_emb`) is its own.

    `prompt_index`: (N,) row of `prompt_emb` that image i was generated from. Ties count as
    misses unless the own prompt is first (argmax), which only matters for untrained models.
    """
    sims = np.asarray(image_emb, np.float64) @ np.asarray(prompt_emb, np.float64).T  # (N, T)
    return np.argmax(sims, axis=1) == np.asarray(prompt_index)


class _Features(torch.nn.Module):
    """Identity "feature extractor" over precomputed embeddings, so torchmetrics' FID and KID
    can reduce SAR-CLIP features that Ray Data actors computed elsewhere."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def embedding_distances(
    reference: np.ndarray,
    generated: np.ndarray,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    seed: int = 0,
) -> dict[str, float]:
    """``{fd, kid, kid_raw, kid_std}`` between two sets of (N, D) SAR-CLIP image embeddings.

    Frechet distance and kernel inception distance from torchmetrics, with the embeddings as
    features. KID draws `kid_subsets` random subsets of min(`kid_subset_size`, N, M) images
    (seeded: the same sets give the same number). Needs >= 2 images per set.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    ref = torch.as_tensor(np.asarray(reference, np.float64))
    gen = torch.as_tensor(np.asarray(generated, np.float64))
    if len(ref) < 2 or len(gen) < 2:
        return {k: float("nan") for k in ("fd", "kid", "kid_raw", "kid_std")}
    dim = ref.shape[1]
    fid = FrechetInceptionDistance(feature=_Features(dim), reset_real_features=False)
    fid.update(ref, real=True)
    fid.update(gen, real=False)
    subset = int(min(kid_subset_size, len(ref), len(gen)))
    with warnings.catch_warnings():  # "KID keeps all features": they are (N, D) embeddings
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=_Features(dim), subsets=kid_subsets, subset_size=subset)
    kid.update(ref, real=True)
    kid.update(gen, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    # KID is an unbiased MMD^2 estimate: around 0 it scatters to either sign, and a set against
    # itself (every pair also a "cross" pair) gives a clearly negative value. Negative means
    # "indistinguishable"; report 0 for it, and keep the raw estimate.
    return {
        "fd": float(max(fid.compute().item(), 0.0)),
        "kid": float(max(kid_mean.item(), 0.0)),
        "kid_raw": float(kid_mean),
        "kid_std": float(kid_std),
    }


# ------------------------------------------------------------------------------- training


@dataclass
class ClipTrainResult:
    """What :func:`train_clip` did; ``path`` loads with :func:`load_clip`."""

    path: Path
    arch: str
    n_train: int
    n_val: int
    epochs: int
    steps: int
    losses: list[float] = field(default_factory=list)  # mean contrastive loss per epoch
    val_retrieval_top1: float = float("nan")  # held-out images vs their distinct captions
    val_chance: float = float("nan")  # 1 / number of distinct held-out captions
    seconds: float = 0.0


class _PairDataset(torch.utils.data.Dataset):
    """(image (S, S) float32 in [0, 1], caption) per record, decoded on access.

    A record with several candidate captions (`texts`) yields the one diffusion training uses
    in `epoch` (`dataset.epoch_caption` of the image's key, the epoch and `seed`): set `epoch`
    before iterating. DataLoader workers copy the dataset when an iteration starts, so they
    see it as long as they are not persistent (see `train_clip`)."""

    def __init__(self, records, norm: NormalizationConfig, size: int, strip_prefix: str | None, seed: int = 0):
        from sar_ray.data.dataset import image_key

        self.records, self.norm, self.size, self.strip, self.seed = records, norm, size, strip_prefix, seed
        self.epoch = 0
        self.keys = [image_key(r.name) for r in records]  # the key training's rows carry

    def __len__(self) -> int:
        return len(self.records)

    def caption(self, i: int) -> str:
        """Record `i`'s training caption in the current epoch (before the prefix is stripped)."""
        from sar_ray.data.dataset import epoch_caption

        r = self.records[i]
        return epoch_caption(r.texts, self.keys[i], self.epoch, self.seed) if r.texts else r.text

    def __getitem__(self, i: int):
        return load_record_image(self.records[i], self.norm, self.size), caption_for_clip(self.caption(i), self.strip)


def load_record_image(record, norm: NormalizationConfig, size: int | None) -> np.ndarray:
    """Decode + normalise (+ training's resize/center crop to `size`) one record: a caption
    table's row, or a WebDataset sample (its `path` names the member in the shard; a complex
    SLC is read as its amplitude |s|, as diffusion training reads it)."""
    from sar_ray.data.dataset import prepare_image
    from sar_ray.data.io import read_pixels, read_pixels_bytes

    if record.image_bytes is not None:
        pixels, bits = read_pixels_bytes(record.image_bytes, record.source)
    else:
        pixels, bits = read_pixels(record.path)
    return prepare_image(pixels, norm, size, bits=bits, name=record.source if record.image_bytes is not None else record.path)


def _records(data: str | os.PathLike, captions=None, image_column="file_name", text_column="text",
             synthetic: SynthConfig | None = None, max_images: int | None = None, on_corrupt: str = "skip"):
    from sar_ray.data.captions import read_table
    from sar_ray.data.synth import synthetic_path
    from sar_ray.data.webdataset import is_shards, list_samples

    if str(data) == "synthetic":  # the scenes' own layout, as build_datasets reads them
        return read_table(synthetic_path(synthetic or SynthConfig()))
    if is_shards(data):
        # Diffusion training's checks and names: the sample key splits and picks the captions;
        # member paths, so only names are held and a worker reads one member's bytes.
        return list_samples(str(data), image_column, text_column, max_images, on_corrupt=on_corrupt)
    return read_table(Path(data).expanduser().absolute(), captions, image_column, list(text_columns(text_column)))


def train_clip(
    data: str | os.PathLike,
    out: str | os.PathLike,
    arch: str = "tiny",
    pretrained: str | os.PathLike | None = None,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 5e-4,
    weight_decay: float = 0.1,
    warmup_steps: int = 10,
    seed: int = 0,
    val_fraction: float = 0.1,
    normalization: NormalizationConfig | None = None,
    captions: str | os.PathLike | None = None,
    image_column: str = "file_name",
    text_column: str | Sequence[str] = "text",
    synthetic: SynthConfig | None = None,
    strip_prefix: str | None = DEFAULT_PREFIX,
    max_images: int | None = None,
    on_corrupt: str = "skip",
    num_workers: int = 0,
    device: str | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> ClipTrainResult:
    """Fine-tune an open_clip model on SAR image-caption pairs with the CLIP contrastive loss.

    `data`: what training reads (a folder with metadata.jsonl, a CSV/Parquet caption table,
    WebDataset shards: a ``.tar``, a folder of them, a brace pattern, or ``synthetic``), read by
    the same readers and normalised the same way (`normalization`, default: the reference
    method). The held-out split is training's (a hash of each file name; of each sample key
    for shards), so images a diffusion trial validates on are also unseen by its evaluator.
    `captions`, `image_column`, `text_column`: as ``data.*`` (a study's; for shards the image
    member such as ``sar.npy`` and dotted JSON paths such as ``caption.MID``); `on_corrupt`: as
    ``data.on_corrupt`` for shard samples that do not fit them; `synthetic`: the
    scenes ``data: synthetic`` means (default: ``SynthConfig()``). With several text columns
    each image trains on the caption diffusion training picks for it in that epoch
    (`dataset.epoch_caption` under `seed`); held-out retrieval keeps each image's fixed one.
    AdamW, linear warmup then cosine decay; saves `out` (see :func:`save_clip`).
    """
    import open_clip

    from sar_ray.data.dataset import split_records

    if epochs <= 0 or batch_size <= 0 or lr <= 0:
        raise ClipError(f"need epochs > 0, batch_size > 0, lr > 0 (got {epochs}, {batch_size}, {lr})")
    t0 = time.time()
    norm = normalization or NormalizationConfig()
    records = _records(data, captions, image_column, text_column, synthetic, max_images, on_corrupt)
    if str(data) == "synthetic":  # what was read, for the saved config
        image_column, text_column = "file_name", "text"
    if max_images is not None:
        records = records[:max_images]
    train_recs, val_recs = split_records(records, val_fraction)
    if len(train_recs) < 2:
        raise ClipError(f"{data}: need at least 2 training images for a contrastive loss (got {len(train_recs)})")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = build_clip(arch, pretrained, seed).to(device)
    model.output_dict = True
    pre = _preprocess_cfg(model_config(arch))
    size = pre["size"]
    mean = torch.tensor(pre["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(pre["std"]).view(1, 3, 1, 1)
    tokenizer = open_clip.SimpleTokenizer(context_length=model_config(arch)["text_cfg"].get("context_length", 77)) \
        if arch in ARCHS else open_clip.get_tokenizer(arch)

    gen = torch.Generator().manual_seed(seed)
    pairs = _PairDataset(train_recs, norm, size, strip_prefix, seed)
    loader = torch.utils.data.DataLoader(
        pairs, batch_size=min(batch_size, len(train_recs)), shuffle=True, drop_last=True, generator=gen,
        # Workers start anew each epoch, with a copy of `pairs` that has the epoch's captions.
        num_workers=num_workers, persistent_workers=False,
    )
    total = epochs * len(loader)
    # No weight decay on gains, biases, embeddings and the temperature (as open_clip's main).
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embedding" in n or "logit_scale" in n else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.98), eps=1e-6,
    )
    warm = min(warmup_steps, max(total // 10, 1))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(total - warm, 1)))
    )
    loss_fn = open_clip.ClipLoss()
    losses, step = [], 0
    model.train()
    for epoch in range(epochs):
        pairs.epoch = epoch  # 0-based, as diffusion training counts the epochs epoch_caption sees
        run, n = 0.0, 0
        for images, texts in loader:
            pixels = to_clip_input(images, size, mean, std).to(device)
            tokens = tokenizer(list(texts)).to(device)
            outd = model(pixels, tokens)
            loss = loss_fn(outd["image_features"], outd["text_features"], outd["logit_scale"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():  # open_clip clamps the temperature at 100
                model.logit_scale.clamp_(0, math.log(100))
            run += loss.item() * len(texts)
            n += len(texts)
            step += 1
        losses.append(run / max(n, 1))
        if on_epoch is not None:
            on_epoch(epoch + 1, losses[-1])

    extra = {
        "strip_prefix": strip_prefix,
        "normalization": norm.model_dump(),
        "pretrained": str(pretrained) if pretrained else None,
        "data": str(data),
        "image_column": image_column,
        "text_columns": list(text_columns(text_column)),
        "epochs": epochs,
        "seed": seed,
        "n_train": len(train_recs),
        "n_val": len(val_recs),
        "final_loss": losses[-1] if losses else None,
    }
    model.eval()
    path = save_clip(model, out, arch, extra)
    result = ClipTrainResult(path, arch, len(train_recs), len(val_recs), epochs, step, losses)
    if val_recs:
        clip = SarClip(model, tokenizer, pre, device, strip_prefix)
        images = np.stack([load_record_image(r, norm, size) for r in val_recs])
        texts = [caption_for_clip(r.text, strip_prefix) for r in val_recs]
        distinct = sorted(set(texts))
        if len(distinct) >= 2:
            index = np.array([distinct.index(t) for t in texts])
            hits = retrieval_hits(clip.encode_images(images), clip.encode_texts(distinct), index)
            result.val_retrieval_top1 = float(hits.mean())
            result.val_chance = 1.0 / len(distinct)
        extra.update(val_retrieval_top1=result.val_retrieval_top1, val_chance=result.val_chance)
        save_meta = json.loads((path / CONFIG_NAME).read_text())
        save_meta["sar_ray"].update(extra)
        (path / CONFIG_NAME).write_text(json.dumps(save_meta, indent=2))
    result.seconds = time.time() - t0
    return result
