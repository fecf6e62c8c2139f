"""Score generated SAR images against real ones: Ray Data pipelines around ``sar_ray.metrics``.

    metrics = score("runs/t1/samples", "data/val", cfg.eval)          # {"stats/kl": 0.03, ...}
    result = evaluate("runs/t1/samples", "data/val", cfg.eval, out=Path("runs/t1/metrics.json"))

Flow (both sets in one dataset, so every CPU works on whichever set has work left):

    list images (driver: caption table or folder listing; no decoding)
      -> ray.data.from_items                          one block per `batch_size` images
      -> map_batches(_describe_batch)   CPU tasks:    decode, normalise, resize if needed,
                                                      histograms, speckle + GLCM descriptors
      -> map_batches(_ClipEmbedder)     actors:       SAR-CLIP image embeddings (GPU if any)
      -> driver: sums of histograms, descriptor and embedding rows (never images)
      -> set distances (``_aggregate``), metrics.json, per-image Parquet

Normalisation: the reference images are normalised with ``cfg.normalization`` (set it to the
training's ``data.normalization``). Generated samples are already the model's [0, 1]
amplitude (16-bit PNG or float TIFF from the sampler), so by default they are only brought
to [0, 1] (method `none`); ``generated_normalized: false`` normalises them like the reference
(to compare two folders of real SAR). Both sets are then compared at one size: ``cfg.size``,
else the first reference image's; other images are resized, with a warning.

Metric names are ``<family>/<metric>[/<detail>]``; :data:`METRIC_DIRECTION` says whether lower
or higher is better (:func:`metric_direction` resolves per-class and per-property names).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sar_ray.config import EvalConfig, NormalizationConfig
from sar_ray.metrics import caption_for_clip
from sar_ray.metrics import glcm as glcm_metrics
from sar_ray.metrics import statistics as stats

if TYPE_CHECKING:  # torch/open_clip load only when the clip family is asked for
    from sar_ray.metrics.clip import SarClip

# CLIP-free runs (and every Ray worker of the CPU step) never import torch.
CLIP_CONFIG_NAME = "open_clip_config.json"

SETS = ("generated", "reference")

#: "min": lower is better (a distance or gap); "max": higher is better.
METRIC_DIRECTION: dict[str, str] = {
    # amplitude distribution of the pooled pixels (normalised [0, 1] amplitude)
    "stats/kl": "min",  # KL(reference || generated), nats, hist_bins bins + pseudo-count
    "stats/js": "min",  # Jensen-Shannon divergence, bits, in [0, 1]
    "stats/wasserstein": "min",  # 1-D earth mover's distance on [0, 1]
    "stats/ks": "min",  # Kolmogorov-Smirnov statistic, in [0, 1]
    # speckle descriptors: gap of the set means (relative to the reference for scale-like
    # descriptors, absolute for the log-cumulants)
    **{f"stats/{d}_gap": "min" for d in stats.DESCRIPTORS},
    # GLCM texture (descriptors = property x distance, averaged over angles)
    "glcm/rel_mean_diff": "min",  # mean over descriptors of |mu_g - mu_r| / mean(|mu_g|, |mu_r|)
    "glcm/wasserstein": "min",  # mean over descriptors of W1 / reference std
    "glcm/frechet": "min",  # Frechet distance of descriptor vectors, z-scored by the reference
    # SAR-CLIP
    "clip/score": "max",  # mean 100 * max(cos(image, its prompt), 0)
    "clip/retrieval_top1": "max",  # own prompt is the closest of the distinct prompts
    "clip/fd": "min",  # Frechet distance of SAR-CLIP image embeddings
    "clip/kid": "min",  # kernel inception distance of SAR-CLIP embeddings, max(KID, 0)
}


def metric_direction(name: str) -> str:
    """"min" or "max" for any metric name, including ``stats/kl/<class>`` and
    ``glcm/rel_mean_diff/<property>``."""
    if name in METRIC_DIRECTION:
        return METRIC_DIRECTION[name]
    base = "/".join(name.split("/")[:2])
    if base in METRIC_DIRECTION:
        return METRIC_DIRECTION[base]
    raise KeyError(f"unknown metric {name!r}; known: {', '.join(METRIC_DIRECTION)}")


@dataclass
class EvalResult:
    """Aggregates of one evaluation and where they were written."""

    metrics: dict[str, float]
    n_generated: int
    n_reference: int
    size: tuple[int, int]
    metrics_path: Path | None = None
    per_image_path: Path | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------- public API


def score(generated: str | os.PathLike, reference: str | os.PathLike, cfg: EvalConfig) -> dict[str, float]:
    """Flat ``{metric name: value}`` of `generated` against `reference` (what a sweep logs)."""
    return evaluate(generated, reference, cfg, out=None, progress=False).metrics


def evaluate(
    generated: str | os.PathLike,
    reference: str | os.PathLike,
    cfg: EvalConfig,
    out: str | os.PathLike | None = None,
    progress: bool = True,
) -> EvalResult:
    """Score two image sets with Ray Data; write ``metrics.json`` + per-image Parquet if `out`.

    `out`: a ``.json`` path (Parquet next to it as ``<stem>_per_image.parquet``) or a folder
    (``metrics.json`` and ``metrics_per_image.parquet`` inside). Raises ``DataError`` /
    ``ImageReadError`` for unusable input, naming the file.
    """
    import ray

    warnings: list[str] = []
    gen_items, w = list_images(generated, "generated", cfg.max_images)
    warnings += w
    ref_items, w = list_images(reference, "reference", cfg.max_images)
    warnings += w
    clip_path = _check_clip_inputs(cfg, gen_items, generated)
    _assign_classes(gen_items, ref_items)
    size = _target_size(cfg, ref_items)

    if not ray.is_initialized():
        # Local Ray by default (RAY_ADDRESS, if set, joins a cluster); quiet: the CLI prints.
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    items = [it.row() for it in gen_items + ref_items]
    with _quiet_ray_data():
        ds = _pipeline(items, cfg, size, clip_path)
        accs = {s: _SetAccumulator(cfg.hist_bins) for s in SETS}
        with _progress(len(items), progress) as advance:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                _raise_unreadable(batch)  # the first unreadable image stops the run
                for s in SETS:
                    accs[s].add(batch, batch["set"] == s)
                advance(len(batch["set"]))

    resized = sum(a.resized for a in accs.values())
    if resized:
        warnings.append(
            f"{resized} images were not {size[0]}x{size[1]} and were resized to it (mixed sizes); "
            "texture and speckle statistics depend on scale"
        )
    prompt_emb_fn = None
    if clip_path is not None:
        from sar_ray.metrics.clip import load_clip

        prompt_emb_fn = load_clip(clip_path, device="cpu").encode_texts
    metrics, summary, per_image, w = _aggregate(accs["generated"], accs["reference"], cfg, prompt_emb_fn)
    warnings += w
    summary["size"] = list(size)
    result = EvalResult(metrics, accs["generated"].n, accs["reference"].n, size, summary=summary, warnings=warnings)
    if out is not None:
        _write(result, per_image, Path(out), generated, reference, cfg)
    return result


def _pipeline(items: list[dict], cfg: EvalConfig, size: tuple[int, int], clip_path: Path | None):
    """The lazy Ray Data dataset of per-image descriptor (and embedding) rows."""
    import ray

    ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / cfg.batch_size)))
    gpus = int(ray.cluster_resources().get("GPU", 0)) if clip_path is not None else 0
    if clip_path is not None and not gpus:
        # CPU only: describe and embed in the same actors, as many as there are CPUs (two
        # operators would be fused by Ray Data into one actor anyway, i.e. run serially).
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        return ds.map_batches(
            _DescribeAndEmbed,
            fn_constructor_kwargs={"path": str(clip_path), "cfg": cfg, "size": size},
            batch_size=cfg.batch_size, batch_format="numpy", concurrency=(1, cpus), num_cpus=1,
        )
    ds = ds.map_batches(
        _describe_batch,
        fn_kwargs={"cfg": cfg, "size": size, "keep_images": clip_path is not None},
        batch_size=cfg.batch_size, batch_format="numpy", num_cpus=1,
    )
    if clip_path is not None:
        # One actor per GPU, loading the model once; the CPU step above stays tasks.
        ds = ds.map_batches(
            _ClipEmbedder,
            fn_constructor_kwargs={"path": str(clip_path), "device": "cuda"},
            batch_size=cfg.clip_batch_size, batch_format="numpy",
            concurrency=gpus, num_gpus=1, num_cpus=0,
        )
    return ds


def score_arrays(
    generated: Sequence[np.ndarray] | np.ndarray,
    reference: Sequence[np.ndarray] | np.ndarray,
    cfg: EvalConfig,
    prompts: Sequence[str] | None = None,
    clip: SarClip | None = None,
) -> dict[str, float]:
    """The same metrics on in-memory [0, 1] images, without Ray or files (notebooks, quick
    in-training checks). Each set's images share one shape; `prompts` and a loaded `clip`
    (default: ``cfg.clip``) are needed for the ``clip`` family."""
    accs = {}
    for name, images in (("generated", generated), ("reference", reference)):
        arr = np.asarray(images, dtype=np.float32)
        if arr.ndim != 3 or len(arr) == 0:
            raise ValueError(f"{name}: expected a non-empty (N, H, W) stack of images, got shape {arr.shape}")
        batch = describe_images(arr, cfg)
        batch["set"] = np.full(len(arr), name, dtype=object)
        batch["index"] = np.arange(len(arr))
        batch["name"] = np.array([f"{name}[{i}]" for i in range(len(arr))], dtype=object)
        texts = list(prompts) if (name == "generated" and prompts is not None) else [""] * len(arr)
        batch["text"] = np.array(texts, dtype=object)
        batch["label"] = np.array([None] * len(arr), dtype=object)
        batch["resized"] = np.zeros(len(arr), bool)
        if "clip" in cfg.metrics:
            if clip is None:
                if cfg.clip is None:
                    raise ValueError("metrics include clip: pass clip= or set eval.clip")
                from sar_ray.metrics.clip import load_clip

                clip = load_clip(cfg.clip)
            batch["clip_embedding"] = clip.encode_images(arr)
        accs[name] = _SetAccumulator(cfg.hist_bins)
        accs[name].add(batch, np.ones(len(arr), bool))
    if "clip" in cfg.metrics and (prompts is None or len(prompts) != len(accs["generated"].rows)):
        raise ValueError("metrics include clip: give one prompt per generated image")
    metrics, _, _, _ = _aggregate(accs["generated"], accs["reference"], cfg, clip.encode_texts if clip else None)
    return metrics


# ------------------------------------------------------------------------------- listing


@dataclass
class _Item:
    set: str
    index: int
    path: str | None
    image_bytes: bytes | None
    name: str
    text: str
    label: str | None

    def row(self) -> dict:
        return dict(self.__dict__)


def list_images(path: str | os.PathLike, role: str, max_images: int | None = None) -> tuple[list[_Item], list[str]]:
    """The images of one set, without decoding: a caption table's rows, or a folder's images.

    A folder with ``metadata.jsonl`` (or one CSV/Parquet table) is read with the training
    readers; a folder of plain images is listed recursively (sorted; the first subfolder name
    is the label, as in Hugging Face imagefolder). Returns (items, warnings).
    """
    from sar_ray.data.captions import TABLE_EXTENSIONS, DataError, read_table
    from sar_ray.data.io import IMAGE_EXTENSIONS

    root = Path(path).expanduser().absolute()
    warnings: list[str] = []
    if not root.exists():
        raise DataError(f"{root}: {role} set not found; give a folder of images or a caption table")
    has_table = root.is_file() or any(
        p.is_file() and (p.name == "metadata.jsonl" or p.suffix.lower() in TABLE_EXTENSIONS) for p in root.iterdir()
    )
    if has_table:
        records = read_table(root)
        items = [
            _Item(role, i, r.path, r.image_bytes, r.name, r.text, r.label) for i, r in enumerate(records)
        ]
    else:
        files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
        images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
        others = [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
        if not images:
            what = (
                f"only {len(others)} files that are not images ({', '.join(p.name for p in others[:3])}"
                f"{', ...' if len(others) > 3 else ''})" if others else "nothing"
            )
            raise DataError(
                f"{root}: no images in the {role} set (found {what}); expected "
                f"{', '.join(IMAGE_EXTENSIONS)} files or a metadata.jsonl"
            )
        if others:
            warnings.append(f"{role}: ignored {len(others)} files that are not images in {root} "
                            f"(e.g. {others[0].name})")
        items = []
        for i, p in enumerate(images):
            rel = p.relative_to(root)
            label = rel.parts[0] if len(rel.parts) > 1 else None
            items.append(_Item(role, i, str(p), None, str(rel), "", label))
    if max_images is not None:
        items = items[:max_images]
    return items, warnings


def _check_clip_inputs(cfg: EvalConfig, gen_items: list[_Item], generated) -> Path | None:
    from sar_ray.data.captions import DataError

    if "clip" not in cfg.metrics:
        return None
    if cfg.clip is None:
        raise DataError("metrics include clip but no SAR-CLIP model is given; pass --clip DIR "
                        "(from `sar-ray clip train`) or drop clip from --metrics")
    path = Path(cfg.clip).expanduser().absolute()
    if not (path / CLIP_CONFIG_NAME).is_file():
        raise DataError(f"{path}: not a SAR-CLIP folder (no {CLIP_CONFIG_NAME}); train one with "
                        "`sar-ray clip train`")
    missing = [it.name for it in gen_items if not str(it.text or "").strip()]
    if missing:
        raise DataError(
            f"{generated}: {len(missing)} of {len(gen_items)} generated images have no prompt "
            f"(first: {missing[0]}); CLIP metrics need metadata.jsonl with file_name and text "
            "(the sampler writes it), or leave clip out of --metrics"
        )
    return path


def _assign_classes(gen_items: list[_Item], ref_items: list[_Item]) -> None:
    """Give generated images a class for per-class statistics when they have no label: the
    majority label of reference images whose caption is exactly the prompt."""
    by_caption: dict[str, Counter] = defaultdict(Counter)
    for it in ref_items:
        if it.label is not None:
            by_caption[caption_for_clip(it.text)][it.label] += 1
    for it in gen_items:
        if it.label is None and it.text:
            votes = by_caption.get(caption_for_clip(it.text))
            if votes:
                it.label = votes.most_common(1)[0][0]


def _target_size(cfg: EvalConfig, ref_items: list[_Item]) -> tuple[int, int]:
    if cfg.size is not None:
        return (cfg.size, cfg.size)
    first = ref_items[0]
    return tuple(int(v) for v in _decode(first.path, first.image_bytes, first.name).shape)


# ------------------------------------------------------------------------------- workers


def _decode(path: str | None, data: bytes | None, name: str) -> np.ndarray:
    from sar_ray.data.io import read_image, read_image_bytes

    if isinstance(data, (bytes, bytearray, memoryview)) and len(data):
        return read_image_bytes(bytes(data), path if isinstance(path, str) else name)
    return read_image(path)


def _fit(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[0, 1] image at `size` (H, W): square targets as training (shorter side + center crop)."""
    if img.shape == size:
        return img
    from PIL import Image

    from sar_ray.data.dataset import prepare_image

    if size[0] == size[1]:
        return prepare_image(img, NormalizationConfig(method="none"), size[0])
    out = np.asarray(Image.fromarray(img.astype(np.float32)).resize((size[1], size[0]), Image.Resampling.BICUBIC))
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def load_image(path, data, name, role: str, cfg: EvalConfig, size: tuple[int, int]) -> tuple[np.ndarray, bool]:
    """Decode, normalise (see module docstring) and fit one image; (image, was_resized)."""
    from sar_ray.data.normalize import normalize

    pixels = _decode(path, data, name)
    as_model_output = role == "generated" and cfg.generated_normalized
    img = normalize(pixels, NormalizationConfig(method="none") if as_model_output else cfg.normalization)
    fitted = _fit(img, size)
    return fitted, fitted is not img


def describe_images(images: np.ndarray, cfg: EvalConfig) -> dict[str, np.ndarray]:
    """Per-image sufficient statistics and descriptors of (N, H, W) [0, 1] images."""
    n = len(images)
    out: dict[str, np.ndarray] = {
        "hist": np.stack([stats.amplitude_histogram(im, cfg.hist_bins) for im in images]),
        "hist_fine": np.stack([stats.amplitude_histogram(im, stats.CDF_BINS) for im in images]).astype(np.int32),
    }
    # Speckle descriptors always: cheap next to decoding, and the per-image table shows them.
    rows = [stats.sar_descriptors(im, cfg.enl_window, cfg.enl_fraction) for im in images]
    for d in stats.DESCRIPTORS:
        out[f"stats_{d}"] = np.array([r[d] for r in rows], np.float64)
    if "glcm" in cfg.metrics:
        out["glcm"] = glcm_metrics.glcm_descriptors(
            images, cfg.glcm_levels, cfg.glcm_distances, cfg.glcm_angles, cfg.glcm_symmetric
        )
    else:
        out["glcm"] = np.zeros((n, 0))
    return out


def _cell(value, kind):
    # Ray Data turns an all-null column into NaN in numpy batches: anything else is "absent".
    return value if isinstance(value, kind) else None


def _describe_batch(batch: dict[str, np.ndarray], cfg: EvalConfig, size: tuple[int, int], keep_images: bool):
    from sar_ray.data.captions import DataError
    from sar_ray.data.io import ImageReadError

    images, resized, errors = [], [], []
    for i in range(len(batch["set"])):
        try:
            img, was = load_image(
                _cell(batch["path"][i], str), _cell(batch["image_bytes"][i], (bytes, bytearray)),
                str(batch["name"][i]), str(batch["set"][i]), cfg, size,
            )
            err = ""
        except (ImageReadError, DataError) as e:
            # Returned, not raised: Ray loses the exception type on the way to the driver,
            # which raises it (with the file name) so the CLI exits 2 with one clear line.
            img, was, err = np.zeros(size, np.float32), False, f"{type(e).__name__}: {e}"
        images.append(img)
        resized.append(was)
        errors.append(err)
    arr = np.stack(images)  # (B, H, W) float32 in [0, 1]
    out = describe_images(arr, cfg)
    out["error"] = np.asarray(errors, dtype=object)
    for key in ("set", "index", "name", "text"):
        out[key] = np.asarray(batch[key], dtype=object if key != "index" else np.int64)
    out["label"] = np.asarray([_cell(v, str) for v in batch["label"]], dtype=object)
    out["resized"] = np.asarray(resized, bool)
    if keep_images:
        out["image"] = arr
    return out


class _ClipEmbedder:
    """Ray Data actor: SAR-CLIP image embeddings of a batch (model loaded once per actor)."""

    def __init__(self, path: str, device: str):
        from sar_ray.metrics.clip import load_clip

        if device == "cpu":
            import torch

            torch.set_num_threads(1)  # one CPU per actor, as Ray reserved
        self.clip = load_clip(path, device=device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = dict(batch)
        batch["clip_embedding"] = self.clip.encode_images(batch.pop("image"))
        return batch


class _DescribeAndEmbed(_ClipEmbedder):
    """CPU-only Ray Data actor: the descriptors of :func:`_describe_batch`, then embeddings."""

    def __init__(self, path: str, cfg: EvalConfig, size: tuple[int, int]):
        super().__init__(path, "cpu")
        self.cfg, self.size = cfg, size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return super().__call__(_describe_batch(batch, self.cfg, self.size, keep_images=True))


# ------------------------------------------------------------------------------- driver


class _SetAccumulator:
    """Sufficient statistics of one set, summed batch by batch on the driver."""

    def __init__(self, bins: int):
        self.hist = np.zeros(bins, np.int64)
        self.fine = np.zeros(stats.CDF_BINS, np.int64)
        self.class_hist: dict[str, list[np.ndarray]] = {}
        self.rows: list[dict] = []  # per-image descriptors (no pixels)
        self.glcm: list[np.ndarray] = []
        self.emb: list[np.ndarray] = []
        self.resized = 0

    @property
    def n(self) -> int:
        return len(self.rows)

    def add(self, batch: dict[str, np.ndarray], mask: np.ndarray) -> None:
        if not mask.any():
            return
        hist, fine = batch["hist"][mask], batch["hist_fine"][mask]
        self.hist += hist.sum(axis=0)
        self.fine += fine.sum(axis=0, dtype=np.int64)
        labels = batch["label"][mask]
        for lab in set(v for v in labels if isinstance(v, str)):
            sel = labels == lab
            acc = self.class_hist.setdefault(lab, [np.zeros_like(self.hist), np.zeros_like(self.fine)])
            acc[0] += hist[sel].sum(axis=0)
            acc[1] += fine[sel].sum(axis=0, dtype=np.int64)
        self.resized += int(batch["resized"][mask].sum())
        self.glcm.extend(batch["glcm"][mask])
        if "clip_embedding" in batch:
            self.emb.extend(batch["clip_embedding"][mask])
        idx = np.flatnonzero(mask)
        for i in idx:
            row = {
                "set": str(batch["set"][i]),
                "index": int(batch["index"][i]),
                "name": str(batch["name"][i]),
                "text": str(batch["text"][i] or ""),
                "label": _cell(batch["label"][i], str),
                "resized": bool(batch["resized"][i]),
            }
            for d in stats.DESCRIPTORS:
                row[d] = float(batch[f"stats_{d}"][i])
            self.rows.append(row)

    def ordered(self) -> tuple[list[dict], np.ndarray, np.ndarray]:
        """Rows, GLCM matrix and embeddings in input order (batches arrive in any order)."""
        order = np.argsort([r["index"] for r in self.rows], kind="stable")
        rows = [self.rows[i] for i in order]
        glcm = np.asarray(self.glcm, np.float64)[order] if self.glcm else np.zeros((len(rows), 0))
        emb = np.asarray(self.emb, np.float64)[order] if self.emb else np.zeros((len(rows), 0))
        return rows, glcm, emb


def _aggregate(gen: _SetAccumulator, ref: _SetAccumulator, cfg: EvalConfig, encode_texts):
    """(metrics, summary, per-image rows, warnings) from the two sets' sufficient statistics."""
    metrics: dict[str, float] = {}
    summary: dict[str, Any] = {}
    warnings: list[str] = []
    g_rows, g_glcm, g_emb = gen.ordered()
    r_rows, r_glcm, r_emb = ref.ordered()

    if "stats" in cfg.metrics:
        for k, v in stats.histogram_distances(ref.hist, gen.hist, ref.fine, gen.fine, cfg.hist_smoothing).items():
            metrics[f"stats/{k}"] = v
        g_desc = {d: np.array([r[d] for r in g_rows]) for d in stats.DESCRIPTORS}
        r_desc = {d: np.array([r[d] for r in r_rows]) for d in stats.DESCRIPTORS}
        for k, v in stats.descriptor_gaps(r_desc, g_desc).items():
            metrics[f"stats/{k}"] = v
        summary["stats"] = {
            s: {d: _nanmean(desc[d]) for d in stats.DESCRIPTORS} for s, desc in (("generated", g_desc), ("reference", r_desc))
        }
        if cfg.per_class:
            common = sorted(set(gen.class_hist) & set(ref.class_hist))
            for lab in common:
                (rh, rf), (gh, gf) = ref.class_hist[lab], gen.class_hist[lab]
                for k, v in stats.histogram_distances(rh, gh, rf, gf, cfg.hist_smoothing).items():
                    metrics[f"stats/{k}/{lab}"] = v
            summary["classes"] = common
            if not common and gen.n:
                warnings.append(
                    "no per-class statistics: generated images have no labels matching the reference "
                    "(give metadata.jsonl a 'label' column, or prompts equal to reference captions)"
                )

    names = glcm_metrics.descriptor_names(cfg.glcm_distances)
    if "glcm" in cfg.metrics:
        d = glcm_metrics.set_distances(r_glcm, g_glcm, names)
        metrics.update({f"glcm/{k}": v for k, v in d.items()})
        if min(len(g_glcm), len(r_glcm)) < 2:
            warnings.append("glcm/frechet needs >= 2 images per set: nan")
        summary["glcm"] = {
            "generated": dict(zip(names, _colmeans(g_glcm))),
            "reference": dict(zip(names, _colmeans(r_glcm))),
        }

    if "clip" in cfg.metrics and encode_texts is not None:
        from sar_ray.metrics import clip as clip_metrics

        prompts = [r["text"] for r in g_rows]
        distinct = sorted(set(prompts))
        p_emb = encode_texts(distinct)  # (T, D)
        index = np.array([distinct.index(p) for p in prompts])
        per = clip_metrics.clip_scores(g_emb, p_emb[index])
        hits = clip_metrics.retrieval_hits(g_emb, p_emb, index)
        metrics["clip/score"] = float(per.mean())
        if len(distinct) >= 2:
            metrics["clip/retrieval_top1"] = float(hits.mean())
        else:
            metrics["clip/retrieval_top1"] = float("nan")
            warnings.append("clip/retrieval_top1 needs >= 2 distinct prompts: nan")
        d = clip_metrics.embedding_distances(r_emb, g_emb, cfg.kid_subset_size, cfg.kid_subsets, cfg.seed)
        metrics["clip/fd"], metrics["clip/kid"] = d["fd"], d["kid"]
        summary["clip"] = {
            "prompts": len(distinct), "retrieval_chance": 1.0 / len(distinct),
            "kid_raw": d["kid_raw"], "kid_std": d["kid_std"],
        }
        for row, s, h in zip(g_rows, per, hits):
            row["clip_score"], row["clip_retrieval_hit"] = float(s), bool(h)

    per_image = []
    for rows, feats in ((g_rows, g_glcm), (r_rows, r_glcm)):
        for row, f in zip(rows, feats if len(feats) else [None] * len(rows)):
            if f is not None:
                row = {**row, **{f"glcm_{n}": float(v) for n, v in zip(names, f)}}
            per_image.append(row)
    return metrics, summary, per_image, warnings


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else float("nan")


def _colmeans(x: np.ndarray) -> list[float]:
    return [float(v) for v in x.mean(axis=0)] if len(x) else []


def _write(result: EvalResult, per_image: list[dict], out: Path, generated, reference, cfg: EvalConfig) -> None:
    import pandas as pd

    if out.suffix.lower() == ".json":
        metrics_path = out
    else:
        metrics_path = out / "metrics.json"
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    parquet = metrics_path.with_name(f"{metrics_path.stem}_per_image.parquet")
    pd.DataFrame(per_image).to_parquet(parquet, index=False)
    doc = {
        "metrics": {k: _json_float(v) for k, v in result.metrics.items()},
        "direction": {k: metric_direction(k) for k in result.metrics},
        "generated": str(Path(generated).expanduser().absolute()),
        "reference": str(Path(reference).expanduser().absolute()),
        "n_generated": result.n_generated,
        "n_reference": result.n_reference,
        "per_image": parquet.name,
        "summary": result.summary,
        "warnings": result.warnings,
        "config": cfg.model_dump(mode="json"),
    }
    metrics_path.write_text(json.dumps(doc, indent=2, default=_json_float))
    result.metrics_path, result.per_image_path = metrics_path, parquet


def _json_float(v):
    # JSON has no NaN/inf: write null (a metric that could not be computed).
    v = float(v)
    return v if math.isfinite(v) else None


def _raise_unreadable(batch: dict[str, np.ndarray]) -> None:
    """Raise, on the driver, the error a worker returned for an unreadable image."""
    from sar_ray.data.captions import DataError
    from sar_ray.data.io import ImageReadError

    bad = [str(e) for e in batch.get("error", ()) if e]
    if bad:
        kind, _, msg = bad[0].partition(": ")
        more = f" (and {len(bad) - 1} more images in the same batch)" if len(bad) > 1 else ""
        raise (DataError if kind == "DataError" else ImageReadError)(msg + more)


class _quiet_ray_data:
    """Ray Data settings for our pipeline while it runs (restored afterwards): its own progress
    bars and INFO lines off (the CLI shows one bar and one table; sweep logs stay readable),
    and no per-operator CPU reservation."""

    def __enter__(self):
        import logging

        import ray.data

        self.ctx = ray.data.DataContext.get_current()
        self.saved = {}
        # op_resource_reservation: Ray Data reserves half the CPUs per operator for the rest of
        # the pipeline; ours is one CPU map whose output the driver drains at once, and with
        # the reservation a 2-CPU Ray ran one task at a time (1.0x instead of ~1.8x).
        for attr in ("enable_progress_bars", "enable_operator_progress_bars", "print_on_execution_start",
                     "op_resource_reservation_enabled"):
            if hasattr(self.ctx, attr):
                self.saved[attr] = getattr(self.ctx, attr)
                setattr(self.ctx, attr, False)
        self.logger = logging.getLogger("ray.data")
        self.level = self.logger.level
        # Unreadable images come back as values (see _describe_batch); what Ray Data would
        # log here is a crash we re-raise anyway, with its traceback under SAR_RAY_DEBUG.
        self.logger.setLevel(logging.CRITICAL)
        return self

    def __exit__(self, *exc):
        for attr, v in self.saved.items():
            setattr(self.ctx, attr, v)
        self.logger.setLevel(self.level)
        return False


class _progress:
    """A rich progress bar over images scored (stderr), or nothing."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            console=Console(stderr=True), transient=True,
        )
        self.bar.start()
        task = self.bar.add_task("scoring", total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.stop()
        return False
