"""The shared latent cache (`data.cache: auto`): the frozen VAE encoder's posterior of every
training image, computed once by a Ray Data job and read by every trial that does not tune
the VAE, so that a trial's steps make no encoder call.

    data, tags = for_trial(cfg, data, tags)   # run_trial: cached datasets (built on first use)
    prebuild(study_base, shared)              # sweep: build once, before the first trial
    build(cfg, data)                          # `sar-ray data cache FILE`

What is stored: the posterior moments (mean and log-variance on the channel axis, what
diffusers' `DiagonalGaussianDistribution` takes), never a latent sample, so each step still
draws its own sample from the trial's generator (`diffusion.sample_cached`). They are stored in
the encoder's own dtype (fp32, or fp16; bf16 widened to fp32, which is lossless): a cached
draw then equals an uncached one exactly given the same generator state, and the cache costs
what the encoder computes, no more. With `data.flip` the flipped image's posterior is stored
too (the VAE is not flip-equivariant), and the step picks per image (`diffusion.random_flip`).

The key hashes everything the moments depend on: the encoder + quant_conv weights, the
encoder dtype, the prepared pixels' dtype (their rounding), resolution, crop, flip,
normalisation, the seed (crop positions and row order), and the data source (config and a
listing of the files: names, sizes, mtimes). Any change lands in another folder,
`<storage>/latents/<key>/`; a folder whose marker names another key, or whose files do not hold
the counted rows, is a miss and is rebuilt. Written atomically: a tmp folder, the marker last,
then a rename.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from sar_ray.data.captions import DataError
from sar_ray.data.dataset import PIXEL_DTYPE, TrainData, caption_lists

# 2: pixels travel as uint16 (rounded to 1/65535), no longer float32; 3: rows of several caption
# columns carry every candidate (texts, key) for the step's per-epoch choice.
CACHE_VERSION = 3
MARKER = "_cache.json"
LOCAL_ROOT = ".sar-ray-cache/latents"  # next to the synthetic-data cache
COLUMNS = ("latent_moments", "latent_moments_flip", "text", "texts", "key", "original_size", "crop_top_left", "path")


class CacheError(DataError):
    """The cache cannot be used or built (bad input: exit 2)."""


@dataclass
class CachedTrainData(TrainData):
    """Pixel datasets (for trials that tune the VAE) plus the cached ones (`cached`) for `cache_key`."""

    cached: TrainData | None = None
    cache_key: str | None = None


# --------------------------------------------------------------------------------------------
# when, and the key
# --------------------------------------------------------------------------------------------


def wanted(cfg) -> bool:
    """`data.cache: auto` and a frozen VAE: a VAE-tuning trial trains its decoder against pixels."""
    return cfg.data.cache == "auto" and cfg.strategy.vae.mode == "frozen"


def encoder_dtype(model_cfg) -> str:
    """The dtype the trial's frozen encoder runs in (`strategies.place`)."""
    return "fp32" if model_cfg.vae_force_upcast else model_cfg.weight_dtype


def load_vae(model_cfg):
    """The model's VAE alone, in the trial's encoder dtype (a tiny model: built as training builds it)."""
    import torch

    from sar_ray.models import DTYPES, TINY, build_tiny

    dtype = DTYPES[encoder_dtype(model_cfg)]
    if model_cfg.pretrained in TINY:
        vae = build_tiny(model_cfg.pretrained).vae
    else:
        from diffusers import AutoencoderKL

        local = Path(model_cfg.pretrained).is_dir()
        vae = AutoencoderKL.from_pretrained(model_cfg.pretrained, subfolder="vae", revision=model_cfg.revision,
                                            variant=model_cfg.variant, local_files_only=local)
    return torch.nn.Module.to(vae, dtype).eval()


def encoder_hash(vae) -> str:
    """blake2b of the encoder + quant_conv state (names, dtypes, shapes, bytes), sorted by name:
    the same weights give the same hash in every process; one changed bit another."""
    import torch

    h = hashlib.blake2b(digest_size=16)
    for prefix, module in (("encoder", vae.encoder), ("quant_conv", vae.quant_conv)):
        for name, t in sorted(module.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{prefix}.{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def source_identity(dcfg) -> dict[str, Any]:
    """What names the training records: the data config's source keys, and for local data a
    hash of its files' names, sizes and mtimes (an edited caption table or image misses)."""
    ident: dict[str, Any] = {k: getattr(dcfg, k) for k in (
        "path", "captions", "image_column", "text_column", "caption_prefix", "val_fraction", "max_images",
        "on_corrupt")}
    if dcfg.path == "synthetic":
        ident["synthetic"] = dcfg.synthetic.model_dump(mode="json")
        return ident
    p = Path(dcfg.path).expanduser()
    if p.exists():
        ident["path"] = str(p.absolute())
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        h = hashlib.blake2b(digest_size=16)
        for f in files:
            st = f.stat()
            h.update(f"{f.relative_to(p) if f != p else f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        ident["files"] = h.hexdigest()
    return ident


def key_inputs(cfg, vae) -> dict[str, Any]:
    d = cfg.data
    return {
        "version": CACHE_VERSION,
        "encoder": encoder_hash(vae),
        "dtype": encoder_dtype(cfg.model),
        "pixels": np.dtype(PIXEL_DTYPE).name,  # what the encoder is fed: rounded to this dtype's steps
        "resolution": d.resolution,
        "crop": d.crop,
        "flip": d.flip,
        "normalization": d.normalization.model_dump(mode="json"),
        "seed": cfg.train.seed,  # random crop positions and the training row order
        "source": source_identity(d),
    }


def cache_key(inputs: dict[str, Any]) -> str:
    return hashlib.blake2b(json.dumps(inputs, sort_keys=True, default=str).encode(), digest_size=12).hexdigest()


def cache_root(cfg):
    """(pyarrow filesystem, root) of the cache: `<scaling.storage_path>/latents`, else `.sar-ray-cache/latents`."""
    import pyarrow.fs as pafs

    if cfg.scaling.storage_path:
        from sar_ray.trial import storage_filesystem

        fs, root = storage_filesystem(cfg.scaling.storage_path)
        return fs, f"{root.rstrip('/')}/latents"
    return pafs.LocalFileSystem(), str(Path(LOCAL_ROOT).absolute())


# --------------------------------------------------------------------------------------------
# building: a Ray Data job, the encoder in an actor
# --------------------------------------------------------------------------------------------


class _Encode:
    """Ray Data actor: pixel rows -> posterior moments (and those of the flipped image)."""

    def __init__(self, model_cfg: dict, flip: bool, use_gpu: bool):
        import torch

        from sar_ray.config import ModelConfig

        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        vae = load_vae(ModelConfig.model_validate(model_cfg))
        if self.device.type == "cpu" and vae.encoder.conv_in.weight.dtype == torch.float16:
            vae = torch.nn.Module.to(vae, torch.float32)  # as strategies.place: no fp16 kernels on CPU
        self.vae, self.flip = vae.to(self.device), flip

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from sar_ray.diffusion import posterior
        from sar_ray.train import model_pixels

        arr = batch["pixel_values"]
        arr = np.stack(list(arr)) if arr.dtype == object else np.array(arr)
        # Copy the narrow uint16 array, widen on the device: (B, 3, R, R) float32 in [-1, 1].
        px = model_pixels(torch.from_numpy(arr).to(self.device))

        def moments(x):
            with torch.no_grad():
                m = posterior(self.vae, x).parameters  # (B, 2C, R/8, R/8): mean | logvar
            return (m.float() if m.dtype == torch.bfloat16 else m).cpu().numpy()

        out = {k: batch[k] for k in ("text", "key", "original_size", "crop_top_left", "path") if k in batch}
        if "texts" in batch:  # several captions: every candidate, for the step's per-epoch choice
            out["texts"] = caption_lists(batch["texts"])
        out["latent_moments"] = moments(px)
        if self.flip:
            out["latent_moments_flip"] = moments(px.flip(-1))
        return out


def _encode(ds, cfg, flip: bool):
    import ray

    gpus = cfg.scaling.use_gpu and ray.cluster_resources().get("GPU", 0) >= 1
    n = max(1, int(ray.cluster_resources().get("GPU", 0))) if gpus else 1
    return ds.map_batches(
        _Encode, fn_constructor_kwargs={"model_cfg": cfg.model.model_dump(mode="json"), "flip": flip,
                                        "use_gpu": bool(gpus)},
        batch_format="numpy", batch_size=16, concurrency=n, num_gpus=1 if gpus else 0, num_cpus=1,
    )


def build(cfg, data: TrainData, *, vae=None) -> tuple[str, dict, bool]:
    """Encode `data` (pixel rows of `cfg.data`) into `<root>/<key>/` unless a valid cache is
    there; returns (key, marker, whether it was built now). Atomic: written to a tmp folder, marker last, renamed."""
    vae = vae if vae is not None else load_vae(cfg.model)
    inputs = key_inputs(cfg, vae)
    key = cache_key(inputs)
    fs, root = cache_root(cfg)
    final = f"{root}/{key}"
    marker = _valid(fs, final, key, data)
    if marker is not None:
        return key, marker, False
    _remove(fs, final)  # another model's, corrupt or partial: never read
    tmp = f"{root}/{key}.tmp-{uuid.uuid4().hex[:8]}"
    fs.create_dir(tmp, recursive=True)
    _encode(data.train, cfg, cfg.data.flip).write_parquet(f"{tmp}/train", filesystem=fs)
    if data.val is not None:
        # Validation never flips (its loss compares across steps and trials).
        _encode(data.val, cfg, False).write_parquet(f"{tmp}/val", filesystem=fs)
    marker = {"key": key, "inputs": inputs, "n_train": data.n_train, "n_val": data.n_val if data.val is not None else 0,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with fs.open_output_stream(f"{tmp}/{MARKER}") as f:
        f.write(json.dumps(marker, indent=2).encode())
    try:
        fs.move(tmp, final)
    except OSError:  # another process built it meanwhile: keep theirs if it is valid
        _remove(fs, tmp)
        if _valid(fs, final, key, data) is None:
            raise CacheError(f"latent cache {final}: could not be written (another build in the way?)") from None
    return key, marker, True


def _remove(fs, path: str) -> None:
    import pyarrow.fs as pafs

    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def _rows(fs, folder: str) -> int | None:
    """Rows in a folder of Parquet files (from their footers), or None if any is unreadable."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    infos = [i for i in fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
             if i.type == pafs.FileType.File and i.path.endswith(".parquet")]
    try:
        n = 0
        for info in infos:
            with fs.open_input_file(info.path) as f:
                md = pq.read_metadata(f)
                if "latent_moments" not in md.schema.to_arrow_schema().names:
                    return None
                n += md.num_rows
        return n
    except Exception:  # noqa: BLE001 - a truncated or foreign file: the cache is not usable
        return None


def _valid(fs, folder: str, key: str, data: TrainData | None) -> dict | None:
    """The marker of a complete cache for `key` in `folder` (rows match it, and `data`'s
    counts when given), else None."""
    try:
        with fs.open_input_stream(f"{folder}/{MARKER}") as f:
            marker = json.loads(f.read().decode())
    except Exception:  # noqa: BLE001 - missing or corrupt marker: a miss
        return None
    if not isinstance(marker, dict) or marker.get("key") != key:
        return None  # another model's (or another config's) cache: refused
    if data is not None and (marker.get("n_train"), marker.get("n_val")) != (
            data.n_train, data.n_val if data.val is not None else 0):
        return None
    if _rows(fs, f"{folder}/train") != marker.get("n_train"):
        return None
    if marker.get("n_val") and _rows(fs, f"{folder}/val") != marker.get("n_val"):
        return None
    return marker


# --------------------------------------------------------------------------------------------
# reading: what a trial trains on
# --------------------------------------------------------------------------------------------


def _open(cfg, data: TrainData, key: str, marker: dict) -> TrainData:
    import ray.data

    fs, root = cache_root(cfg)
    folder = f"{root}/{key}"

    def read(split: str):
        ds = ray.data.read_parquet(f"{folder}/{split}", filesystem=fs, file_extensions=["parquet"])
        # Cached rows are smaller than the pixels they replace: kept in memory where those were.
        return ds.materialize() if data.materialized else ds

    val = read("val") if marker.get("n_val") else None
    return TrainData(read("train"), val, data.n_train, data.n_val, data.n_skipped, data.skipped, data.source,
                     materialized=data.materialized)


def prebuild(cfg, data: TrainData | None) -> TrainData | None:
    """A sweep, before its first trial: build the cache of the base trial's data and open it
    once; trials with the same key read it from the returned data (no Ray Data job in a trial)."""
    if data is None or cfg.data.cache != "auto":
        return data
    key, marker, _ = build(cfg, data)
    return CachedTrainData(**{f.name: getattr(data, f.name) for f in fields(TrainData)},
                           cached=_open(cfg, data, key, marker), cache_key=key)


def for_trial(cfg, data: TrainData, tags: dict | None) -> tuple[TrainData, dict]:
    """The datasets a trial trains on, and its MLflow tags: cached (built on first use) where
    `wanted`, else the pixels. Tags `data.cache_used` and `data.cache_key` say which."""
    tags = dict(tags or {})
    if not wanted(cfg):  # off, or the VAE trains (against pixels)
        tags["data.cache_used"] = "false"
        return data, tags
    vae = load_vae(cfg.model)
    key = cache_key(key_inputs(cfg, vae))
    if isinstance(data, CachedTrainData) and data.cache_key == key and data.cached is not None:
        cached = data.cached
    else:
        key, marker, _ = build(cfg, data, vae=vae)
        cached = _open(cfg, data, key, marker)
    tags.update({"data.cache_used": "true", "data.cache_key": key})
    return cached, tags


# --------------------------------------------------------------------------------------------
# counting encoder calls (the worker reports the count in its "end" record)
# --------------------------------------------------------------------------------------------


class EncoderCalls:
    """Counts forward calls of `vae.encoder` (a forward hook)."""

    def __init__(self, vae):
        self.n = 0
        self._handle = vae.encoder.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.n += 1

