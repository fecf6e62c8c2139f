"""The shared caches of `data.cache: auto`, two halves:

- latents: the frozen VAE encoder's posterior of every training image, computed once by a Ray
  Data job and read by every trial that does not tune the VAE, so that a trial's steps make no
  VAE encoder call;
- text embeddings: the frozen text encoders' output for every caption the data can train or
  validate on (every candidate of several caption columns, and "" for dropped captions),
  computed once by a Ray Data job and read by every trial whose text encoders are all frozen
  and whose `<SAR>` token is not learned (`strategy.token: none`), so that its steps make no
  text encoder call.

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

The text half (`text_wanted`, `build_text`, `TextEmbeddings`) stores one row per distinct
caption under `<storage>/text/<key>/`: SD 1.x/2.x the prompt embeds (last hidden state), SDXL
both encoders' penultimate hidden states concatenated and the second's pooled embeds: exactly
`models.encode_text`'s output, computed under the trial's autocast, stored in the dtype it
came out in (bf16 widened to fp32, losslessly) and cast back on lookup. Captions reach the cache
as the step sees them (`data.caption_prefix` applied by the dataset); a dropped caption gets
what it gets uncached (`diffusion.conditioning`: the embedding of "" for SD, the caption's
embedding zeroed for SDXL). The key hashes the text encoders' weights and pooling config
(`models.pool_at_eos`), the tokenizers (vocabulary, merges, added tokens, length, padding), the
encoders' dtype and the autocast they run under, the caption prefix and columns, and the data
source; the table is small (distinct captions, not images) and travels to the workers with the
trial's config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from sar_ray.data.captions import DataError
from sar_ray.data.dataset import PIXEL_DTYPE, TrainData, caption_lists

# 2: pixels travel as uint16 (rounded to 1/65535), no longer float32; 3: rows of several caption
# columns carry every candidate (texts, key) for the step's per-epoch choice; 4: normalization
# `none` divides by the file's stored depth (a dark 16-bit image was read as 8-bit); 5: a TIFF's
# BitsPerSample (12) is that depth, not its 16-bit storage word.
log = logging.getLogger(__name__)

CACHE_VERSION = 5
MARKER = "_cache.json"
LOCAL_ROOT = ".sar-ray-cache/latents"  # next to the synthetic-data cache
TEXT_VERSION = 1
TEXT_LOCAL_ROOT = ".sar-ray-cache/text"
# A trial holds the whole text table on each worker's device: worth it for templated captions
# (the synthetic scenes'), not for one caption per image (SARLO-80: 3 x 120k
# captions x 0.6 MiB of SDXL embeds = 200 GiB), whose trials run their frozen text encoders.
TEXT_BUDGET = 1 << 30
COLUMNS = ("latent_moments", "latent_moments_flip", "text", "texts", "key", "original_size", "crop_top_left", "path")


class CacheError(DataError):
    """The cache cannot be used or built (bad input: exit 2)."""


@dataclass
class CachedTrainData(TrainData):
    """Pixel datasets (for trials that tune the VAE) plus the cached ones (`cached`) for `cache_key`."""

    cached: TrainData | None = None
    cache_key: str | None = None
    text_key: str | None = None  # the text-embedding cache built with these data (`prebuild`)
    text_table: dict | None = None
    text_skipped: str | None = None  # why no table was built (`text_too_large`)


# --------------------------------------------------------------------------------------------
# when, and the key
# --------------------------------------------------------------------------------------------


def reads_latents(strategy) -> bool:
    """A frozen VAE: a VAE-tuning trial trains its decoder against pixels."""
    return strategy.vae.mode == "frozen"


def wanted(cfg) -> bool:
    """`data.cache: auto` and a trial that reads latents (`reads_latents`)."""
    return cfg.data.cache == "auto" and reads_latents(cfg.strategy)


def halves(points) -> tuple[bool, bool]:
    """(latents, text): whether some of the trial configs `points` reads each half of the cache
    (`reads_latents`, `reads_text`), whatever their `data.cache`."""
    return (any(reads_latents(p.strategy) for p in points), any(reads_text(p.strategy) for p in points))


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


def cache_root(cfg, half: str = "latents"):
    """(pyarrow filesystem, root) of a cache half (`latents` or `text`): `<scaling.storage_path>/<half>`,
    else `.sar-ray-cache/<half>`."""
    import pyarrow.fs as pafs

    if cfg.scaling.storage_path:
        from sar_ray.trial import storage_filesystem

        fs, root = storage_filesystem(cfg.scaling.storage_path)
        return fs, f"{root.rstrip('/')}/{half}"
    return pafs.LocalFileSystem(), str(Path(LOCAL_ROOT if half == "latents" else TEXT_LOCAL_ROOT).absolute())


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
    # The rows written, not the listing's counts: a streamed image that passed the header scan
    # but does not decode (data.on_corrupt=skip) is not among them. `listed` is what `_valid`
    # compares with the next listing.
    n_train = _rows(fs, f"{tmp}/train")
    n_val = _rows(fs, f"{tmp}/val") if data.val is not None else 0
    if n_train is None or n_val is None:  # a footer that does not read back: never a count of 0
        _remove(fs, tmp)
        raise CacheError(f"latent cache {tmp}: the rows just written do not read back (storage error?); "
                         "run again, or set data.cache=off")
    if not n_train:
        _remove(fs, tmp)
        raise DataError(f"{data.source}: none of its {data.n_train} training images decodes "
                        "(each was skipped as unreadable); check the files data.path names")
    marker = {"key": key, "inputs": inputs, "n_train": n_train, "n_val": n_val, "listed": _listed(data),
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with fs.open_output_stream(f"{tmp}/{MARKER}") as f:
        f.write(json.dumps(marker, indent=2).encode())
    try:
        fs.move(tmp, final)
    except OSError:  # another process built it meanwhile: keep theirs if it is valid
        _remove(fs, tmp)
        marker = _valid(fs, final, key, data)  # theirs: its counts are the rows it holds
        if marker is None:
            raise CacheError(f"latent cache {final}: could not be written (another build in the way?)") from None
    return key, marker, True


def _remove(fs, path: str) -> None:
    import pyarrow.fs as pafs

    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def _rows(fs, folder: str, column: str = "latent_moments") -> int | None:
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
                if column not in md.schema.to_arrow_schema().names:
                    return None
                n += md.num_rows
        return n
    except Exception:  # noqa: BLE001 - a truncated or foreign file: the cache is not usable
        return None


def _marker(fs, folder: str, key: str) -> dict | None:
    """The marker of `folder` if it names `key`, else None (missing, corrupt, or another
    model's or config's cache: refused)."""
    try:
        with fs.open_input_stream(f"{folder}/{MARKER}") as f:
            marker = json.loads(f.read().decode())
    except Exception:  # noqa: BLE001 - missing or corrupt marker: a miss
        return None
    return marker if isinstance(marker, dict) and marker.get("key") == key else None


def _listed(data: TrainData) -> list[int]:
    """The (train, val) counts of the listing a cache was built from."""
    return [data.n_train, data.n_val if data.val is not None else 0]


def _valid(fs, folder: str, key: str, data: TrainData | None) -> dict | None:
    """The marker of a complete cache for `key` in `folder` (rows match it, and `data`'s
    counts when given), else None."""
    marker = _marker(fs, folder, key)
    if marker is None:
        return None
    if data is not None and marker.get("listed", [marker.get("n_train"), marker.get("n_val")]) != _listed(data):
        return None
    if _rows(fs, f"{folder}/train") != marker.get("n_train"):
        return None
    if marker.get("n_val") and _rows(fs, f"{folder}/val") != marker.get("n_val"):
        return None
    return marker


# --------------------------------------------------------------------------------------------
# reading: what a trial trains on
# --------------------------------------------------------------------------------------------


def open_latents(cfg, data: TrainData, key: str, marker: dict) -> TrainData:
    import ray.data

    fs, root = cache_root(cfg)
    folder = f"{root}/{key}"

    def read(split: str):
        ds = ray.data.read_parquet(f"{folder}/{split}", filesystem=fs, file_extensions=["parquet"])
        # Cached rows are smaller than the pixels they replace: kept in memory where those were.
        return ds.materialize() if data.materialized else ds

    val = read("val") if marker.get("n_val") else None
    # The marker's counts are the rows the cache holds: exact, where a streamed listing's are
    # an upper bound (its images that did not decode are skipped, and counted here).
    n_train, n_val = marker["n_train"], marker.get("n_val", 0)
    dropped = sum(_listed(data)) - n_train - n_val
    return TrainData(read("train"), val, n_train, n_val, data.n_skipped + dropped, data.skipped, data.source,
                     materialized=data.materialized)


def prebuild(cfg, data: TrainData | None, points: list | None = None) -> TrainData | None:
    """A sweep, before its first trial: build the caches of the base trial's data and open them
    once; trials with the same key read them from the returned data (no Ray Data job in a
    trial). `points` (the trial configs the search can produce, `sweep.search_configs`; default
    the base trial): each half is built only if one of them reads it (`halves`), so a grid that
    tunes every VAE encodes no latents and one that tunes the text side (or learns the token) in
    every point runs no text encoder ahead."""
    if data is None or cfg.data.cache != "auto":
        return data
    latents, text = halves(points or [cfg])
    if not (latents or text):
        return data
    key = cached = None
    if latents:
        key, marker, _ = build(cfg, data)
        cached = open_latents(cfg, data, key, marker)
    text_key = skipped = None
    if text:  # the captions read from the cached rows when there are (no pixels)
        text_key, text_marker, _ = build_text(cfg, cached or data)
        skipped = text_marker.get("skipped")
    return CachedTrainData(**{f.name: getattr(data, f.name) for f in fields(TrainData)},
                           cached=cached, cache_key=key, text_key=text_key, text_skipped=skipped,
                           text_table=None if skipped or not text else open_text(cfg, text_key))


def for_trial(cfg, data: TrainData, tags: dict | None) -> tuple[TrainData, dict]:
    """The datasets a trial trains on, and its MLflow tags: cached (built on first use) where
    `wanted`, else the pixels; with `text_embeds` set to the text-embedding table where
    `text_wanted` (else None). Tags `data.cache_used` / `data.cache_key` and
    `data.text_cache_used` / `data.text_cache_key` say which."""
    tags = dict(tags or {})
    shared = data if isinstance(data, CachedTrainData) else None
    if not wanted(cfg):  # off, or the VAE trains (against pixels)
        tags["data.cache_used"] = "false"
        out = data
    else:
        vae = load_vae(cfg.model)
        key = cache_key(key_inputs(cfg, vae))
        if shared is not None and shared.cache_key == key and shared.cached is not None:
            out = shared.cached
        else:
            key, marker, _ = build(cfg, data, vae=vae)
            out = open_latents(cfg, data, key, marker)
        tags.update({"data.cache_used": "true", "data.cache_key": key})
    table = None
    if not text_wanted(cfg):  # off, or a text encoder or the token trains
        tags["data.text_cache_used"] = "false"
    else:
        c = load_text(cfg.model)
        key = cache_key(text_key_inputs(cfg, c))
        if shared is not None and shared.text_key == key and (shared.text_table is not None or shared.text_skipped):
            table, skipped = shared.text_table, shared.text_skipped
        else:
            key, marker, _ = build_text(cfg, out, c=c)
            skipped = marker.get("skipped")
            table = None if skipped else open_text(cfg, key)
        if skipped:
            tags.update({"data.text_cache_used": "false", "data.text_cache_skipped": skipped})
        else:
            tags.update({"data.text_cache_used": "true", "data.text_cache_key": key})
    plain = {f.name: getattr(out, f.name) for f in fields(TrainData)}
    return TrainData(**{**plain, "text_embeds": table}), tags


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


class TextEncoderCalls:
    """Counts forward calls of the text encoders (a forward hook on each: an SDXL step that
    encodes its captions makes 2). `paused()`: calls not counted (sampling, whose prompts the
    cache never replaces)."""

    def __init__(self, text_encoders):
        self.n, self._paused = 0, False
        self._handles = [te.register_forward_hook(self._hook) for te in text_encoders]

    def _hook(self, *_):
        if not self._paused:
            self.n += 1

    @contextmanager
    def paused(self):
        was, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = was


# --------------------------------------------------------------------------------------------
# the text half: when, the key
# --------------------------------------------------------------------------------------------


def reads_text(strategy) -> bool:
    """Every text encoder frozen and no learned token: the text side is a fixed function of the
    caption (a LoRA / full text encoder or `strategy.token: learn` changes it every step)."""
    encoders = [strategy.text_encoder, strategy.text_encoder_2 or strategy.text_encoder]
    return strategy.token == "none" and all(e.mode == "frozen" for e in encoders)


def text_wanted(cfg) -> bool:
    """`data.cache: auto` and a trial that reads text embeddings (`reads_text`)."""
    return cfg.data.cache == "auto" and reads_text(cfg.strategy)


def load_text(model_cfg):
    """The model's text encoders and tokenizers (a `Components` without UNet and VAE), loaded
    as a trial loads its frozen ones: `model.weight_dtype`, pooling at `<|endoftext|>`."""
    from sar_ray.models import load_components

    c = load_components(model_cfg, text_only=True)
    c.unet = c.vae = None
    return c


def text_encoder_hash(c) -> str:
    """blake2b of every text encoder's state (names, dtypes, shapes, bytes) and the config keys
    that change its output (the pooling position `eos_token_id`, the hidden activation)."""
    import torch

    h = hashlib.blake2b(digest_size=16)
    for name, te in zip(c.text_encoder_names, c.text_encoders):
        cfg = te.config
        h.update(f"{name}:{type(te).__name__}:{cfg.eos_token_id}:{getattr(cfg, 'hidden_act', None)}:"
                 f"{getattr(cfg, 'layer_norm_eps', None)}\n".encode())
        for pname, t in sorted(te.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}.{pname}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tokenizer_hash(c) -> str:
    """blake2b of what turns a caption into ids: each tokenizer's class, vocabulary (added tokens
    included), BPE merges, maximum length, padding and special tokens."""
    h = hashlib.blake2b(digest_size=16)
    for tok in c.tokenizers:
        h.update(f"{type(tok).__name__}:{tok.model_max_length}:{tok.padding_side}:{tok.truncation_side}:"
                 f"{tok.pad_token}:{tok.bos_token}:{tok.eos_token}:{tok.unk_token}\n".encode())
        h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
        ranks = getattr(tok, "bpe_ranks", None)
        if ranks:
            h.update(json.dumps(sorted((" ".join(k), v) for k, v in ranks.items())).encode())
    return h.hexdigest()


def text_dtype(cfg) -> str:
    """The frozen text encoders' dtype in a trial (`strategies.place`: `model.weight_dtype`)."""
    return cfg.model.weight_dtype


def text_key_inputs(cfg, c) -> dict[str, Any]:
    d = cfg.data
    return {
        "version": TEXT_VERSION,
        "kind": c.kind,
        "force_zeros_for_empty_prompt": c.force_zeros_for_empty_prompt,
        "text_encoders": text_encoder_hash(c),
        "tokenizers": tokenizer_hash(c),
        "dtype": text_dtype(cfg),
        "autocast": cfg.train.mixed_precision,  # the step encodes under the trial's autocast
        "caption_prefix": d.caption_prefix,  # prefixed by the dataset: the captions the step sees
        "text_column": d.text_column,
        "source": source_identity(d),
    }


# --------------------------------------------------------------------------------------------
# the text half: building (a Ray Data job over the distinct captions) and reading
# --------------------------------------------------------------------------------------------


def captions_of(data: TrainData, limit: int | None = None) -> list[str] | None:
    """Every caption a trial on `data` can condition on, sorted: each row's `text` and every
    candidate of `texts` (the per-epoch choice), of train and validation, and "" (a dropped
    caption of SD 1.x/2.x). Reads only the caption columns (a cached dataset: no pixels).
    None as soon as more than `limit` distinct captions are seen (the rest is not read)."""
    out = {""}
    for ds in (data.train, data.val):
        if ds is None:
            continue
        cols = [k for k in ("text", "texts") if k in ds.schema().names]
        for b in ds.select_columns(cols).iter_batches(batch_size=4096, batch_format="numpy"):
            out.update(str(t) for t in b["text"])
            if "texts" in b:
                for texts in b["texts"]:
                    out.update(str(t) for t in texts)
            if limit is not None and len(out) > limit:
                return None
    return sorted(out)


def place_text(c, device):
    """The text encoders on `device` in a trial's dtype for them (`strategies.place`: fp16 is
    fp32 on CPU)."""
    import torch

    for i, te in enumerate(c.text_encoders):
        if device.type == "cpu" and next(te.parameters()).dtype == torch.float16:
            te = torch.nn.Module.to(te, torch.float32)
        c.text_encoders[i] = te.to(device).eval()
    return c


def _projection(c):
    """SDXL's pooled-embeds projection (the second encoder's `text_projection`), else None."""
    from transformers import CLIPTextModelWithProjection

    return next((te.text_projection for te in c.text_encoders if isinstance(te, CLIPTextModelWithProjection)), None)


def encode_captions(c, captions: list[str], mixed_precision: str, device) -> dict[str, np.ndarray]:
    """`models.encode_text` of `captions` as a step computes it (under the trial's autocast, no
    gradient) -> numpy columns `prompt_embeds` (B, 77, D) and, SDXL, `pooled_hidden` (B, D2):
    what the second encoder's `text_projection` takes (its pooled, final-norm state at
    `<|endoftext|>`). The projection itself runs in the step (`TextEmbeddings.lookup`): a small
    matmul rounds a row by its place in the batch (BLAS kernels for a few rows), so only the
    step's own batch gives the uncached bits. bf16 widened to fp32 (lossless), the dtype they
    came out in under `*_dtype`."""
    import torch

    from sar_ray.diffusion import autocast
    from sar_ray.models import encode_text

    proj, seen = _projection(c), []
    handle = proj.register_forward_hook(lambda _m, args, _out: seen.append(args[0])) if proj is not None else None
    try:
        with torch.no_grad(), autocast(device, mixed_precision):
            embeds, _ = encode_text(c, list(captions), device)
    finally:
        if handle is not None:
            handle.remove()
    out: dict[str, Any] = {}
    for name, t in (("prompt_embeds", embeds), ("pooled_hidden", seen[0] if seen else None)):
        if t is None:
            continue
        out[f"{name}_dtype"] = np.array([str(t.dtype).removeprefix("torch.")] * len(captions))
        out[name] = (t.float() if t.dtype == torch.bfloat16 else t).cpu().numpy()
    return out


def text_table(c, captions: list[str], mixed_precision: str, device) -> dict[str, Any]:
    """`open_text`'s table for `captions`, encoded here and now (tests, benches: no Ray, no files)."""
    cols = encode_captions(c, captions, mixed_precision, device)
    table: dict[str, Any] = {"captions": [str(t) for t in captions]}
    for name in ("prompt_embeds", "pooled_hidden"):
        table[name] = cols.get(name)
        table[f"{name}_dtype"] = str(cols[f"{name}_dtype"][0]) if name in cols else None
    return table


class _EncodeText:
    """Ray Data actor: caption rows -> the frozen text encoders' output."""

    def __init__(self, model_cfg: dict, mixed_precision: str, use_gpu: bool):
        import torch

        from sar_ray.config import ModelConfig

        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.c = place_text(load_text(ModelConfig.model_validate(model_cfg)), self.device)
        self.mixed_precision = mixed_precision

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        captions = [str(t) for t in batch["text"]]
        return {"text": np.array(captions, dtype=object),
                **encode_captions(self.c, captions, self.mixed_precision, self.device)}


def text_row_bytes(c) -> int:
    """Bytes one caption takes in the table a trial holds (fp32: bf16 is widened)."""
    width = sum(te.config.hidden_size for te in c.text_encoders)
    proj = _projection(c)
    pooled = proj.in_features if proj is not None else 0
    return 4 * (c.tokenizers[0].model_max_length * width + pooled)


def text_limit(c) -> int:
    """The most distinct captions whose table fits TEXT_BUDGET."""
    return TEXT_BUDGET // text_row_bytes(c)


def text_too_large(c) -> str:
    """Why no table is built: more than `text_limit` distinct captions."""
    row, limit = text_row_bytes(c), text_limit(c)
    return (f"more than {limit} distinct captions x {row / 2**20:.2f} MiB (over the {TEXT_BUDGET / 2**30:.0f} GiB a "
            "trial would hold on each device); frozen text encoders run in each step")


def build_text(cfg, data: TrainData, *, c=None) -> tuple[str | None, dict, bool]:
    """Encode every caption of `data` (`captions_of`) into `<root>/<key>/` unless a valid
    text cache is there; returns (key, marker, whether it was built now). Atomic as `build`.
    Too many distinct captions for a table a trial holds (`text_limit`): (key,
    {"skipped": why, ...}, False), nothing written."""
    import ray
    import ray.data

    c = c if c is not None else load_text(cfg.model)
    inputs = text_key_inputs(cfg, c)
    key = cache_key(inputs)
    fs, root = cache_root(cfg, "text")
    final = f"{root}/{key}"
    marker = _valid_text(fs, final, key)
    if marker is not None:
        return key, marker, False
    captions = captions_of(data, limit=text_limit(c))  # stops reading once over the budget
    if captions is None:
        why = text_too_large(c)
        log.warning("text cache not built: %s", why)
        return key, {"key": key, "skipped": why}, False
    _remove(fs, final)
    tmp = f"{root}/{key}.tmp-{uuid.uuid4().hex[:8]}"
    fs.create_dir(tmp, recursive=True)
    gpus = cfg.scaling.use_gpu and ray.cluster_resources().get("GPU", 0) >= 1
    ds = ray.data.from_items([{"text": t} for t in captions])
    ds.map_batches(
        _EncodeText, fn_constructor_kwargs={"model_cfg": cfg.model.model_dump(mode="json"),
                                            "mixed_precision": cfg.train.mixed_precision, "use_gpu": bool(gpus)},
        batch_format="numpy", batch_size=64, concurrency=1, num_gpus=1 if gpus else 0, num_cpus=1,
    ).write_parquet(tmp, filesystem=fs)
    marker = {"key": key, "inputs": inputs, "n_captions": len(captions),
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with fs.open_output_stream(f"{tmp}/{MARKER}") as f:
        f.write(json.dumps(marker, indent=2).encode())
    try:
        fs.move(tmp, final)
    except OSError:
        _remove(fs, tmp)
        if _valid_text(fs, final, key) is None:
            raise CacheError(f"text cache {final}: could not be written (another build in the way?)") from None
    return key, marker, True


def _valid_text(fs, folder: str, key: str) -> dict | None:
    """The marker of a complete text cache for `key` in `folder` (its rows match it), else None."""
    marker = _marker(fs, folder, key)
    if marker is None:
        return None
    if _rows(fs, folder, "prompt_embeds") != marker.get("n_captions"):
        return None
    return marker


def open_text(cfg, key: str) -> dict[str, Any]:
    """The text cache `key` as numpy: {"captions": [str], "prompt_embeds": (N, 77, D),
    "pooled_hidden": (N, D2) | None, "*_dtype": torch dtype names}: what `TextEmbeddings` takes."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs, root = cache_root(cfg, "text")
    folder = f"{root}/{key}"
    files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(folder))
                   if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
    parts: dict[str, list] = {}
    for path in files:
        with fs.open_input_file(path) as f:
            t = pq.read_table(f)
        for name in t.column_names:
            col = t.column(name)
            if name.endswith("_dtype") or name == "text":
                parts.setdefault(name, []).extend(col.to_pylist())
            else:
                parts.setdefault(name, []).append(_tensor_column(col))
    table: dict[str, Any] = {"captions": [str(t) for t in parts.get("text", [])]}
    for name in ("prompt_embeds", "pooled_hidden"):
        table[name] = np.concatenate(parts[name]) if name in parts else None
        table[f"{name}_dtype"] = parts[f"{name}_dtype"][0] if parts.get(f"{name}_dtype") else None
    return table


def _tensor_column(col) -> np.ndarray:
    """A Ray Data tensor column (Arrow extension type) -> (N, ...) numpy."""
    col = col.combine_chunks() if hasattr(col, "combine_chunks") else col
    if hasattr(col.type, "to_pandas_dtype") and hasattr(col, "to_numpy") and hasattr(col.type, "shape"):
        return col.to_numpy()
    return np.stack([np.asarray(x) for x in col.to_pylist()])


class TextEmbeddings:
    """The step's view of the text cache: captions -> (prompt_embeds, pooled | None) on the
    device, exactly `models.encode_text`'s output for them (`diffusion.conditioning`). SDXL's
    pooled embeds: the cached pooled state through the model's own `text_projection`, on the
    step's batch (one (B, D2) x (D2, P) matmul, not a text encoder call)."""

    def __init__(self, table: dict[str, Any], device):
        import torch

        self.index = {t: i for i, t in enumerate(table["captions"])}
        self.device = device

        def tensor(name):
            arr = table.get(name)
            if arr is None:
                return None
            dtype = getattr(torch, table[f"{name}_dtype"])
            return torch.from_numpy(np.ascontiguousarray(arr)).to(device=device, dtype=dtype)

        self.embeds, self.pooled = tensor("prompt_embeds"), tensor("pooled_hidden")

    def __len__(self) -> int:
        return len(self.index)

    def lookup(self, captions: list[str], device=None, c=None):
        """(prompt_embeds (B, 77, D), pooled (B, P) | None) of `captions`; SDXL needs `c` (its projection)."""
        import torch

        missing = [t for t in captions if t not in self.index]
        if missing:
            raise KeyError(f"text cache holds no embedding for caption {missing[0]!r} ({len(self)} captions "
                           f"cached): built from other data? rebuild with `sar-ray data cache`")
        idx = torch.tensor([self.index[t] for t in captions], device=self.embeds.device)
        device = device if device is not None else self.device
        embeds = self.embeds.index_select(0, idx).to(device)
        pooled = None
        if self.pooled is not None:
            proj = _projection(c) if c is not None else None
            if proj is None:
                raise ValueError("an SDXL text cache needs the model's text_projection (lookup(..., c=components))")
            pooled = proj(self.pooled.index_select(0, idx).to(device))
        return embeds, pooled

