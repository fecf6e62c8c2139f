"""Score generated SAR images against real ones: Ray Data pipelines around ``sar_ray.metrics``.

    metrics = score("runs/t1/samples", "data/val", cfg.eval)          # {"stats/kl": 0.03, ...}
    result = evaluate("runs/t1/samples", "data/val", cfg.eval, out=Path("runs/t1/metrics.json"))

Flow (both sets in one dataset, so every CPU works on whichever set has work left):

    list images (driver: caption table or folder listing; no decoding)
      -> ray.data.from_items                          one block per `batch_size` images
      -> map_batches(_describe_batch)   CPU tasks:    decode, normalise, resize if needed, each
                                                      model-free family's `describe` (stats, glcm)
      -> map_batches(_ModelDescriber)   actors:       families with a model (SAR-CLIP; GPU if any)
      -> driver: per-image descriptor rows, pooled histograms as sums (never images)
      -> each family's `aggregate`, bootstrap intervals, metrics.json, per-image Parquet

The families (what is described and how it is aggregated, directions, report columns) live in
:mod:`sar_ray.metrics.families`, one module each.

Reference cache: every trial of a sweep scores against the same reference, so its described
state (pooled histograms, per-image descriptors) is kept under ``cfg.cache_dir``, keyed by the
listed files (path, size, mtime), the settings that change a descriptor and the descriptor
code (:class:`_ReferenceCache`); a hit describes only the generated images. ``summary`` says
whether it hit. ``cfg.max_images`` takes a seeded sample stratified by label
(:func:`stratified_sample`), so a capped imagefolder keeps every class.

Normalisation: the reference images are normalised with ``cfg.normalization`` (set it to the
training's ``data.normalization``). The generated set is either model output, already the
model's [0, 1] amplitude (16-bit PNG or float TIFF from the sampler), and only brought to
[0, 1] (method `none`), or anything else (e.g. a folder of real SAR), normalised like the
reference. ``generated_normalized: auto`` (default) decides by the folder: sample folders
written by sar-ray carry ``samples.json`` (:data:`SAMPLES_MARKER`) and are model output;
``true`` / ``false`` force either. The result says which each set got. Both sets are then
compared at one size: ``cfg.size``, else the first reference image's; other images are
resized, with a warning (as is a generated set at another bit depth than the reference).

Uncertainty: every set-level metric gets a 95% bootstrap interval over the generated images
(``cfg.bootstrap`` resamples with replacement, seeded by ``cfg.seed``), computed from the
per-image descriptors on the driver. Only the generated set is resampled: strategies are
compared against one fixed reference, so what separates them is their own samples' variation.

Metric names are ``<family>/<metric>[/<detail>]``, interval bounds ``<metric>.ci_lo`` /
``<metric>.ci_hi``; :data:`METRIC_DIRECTION` says whether lower or higher is better
(:func:`metric_direction` resolves per-class, per-property and interval names).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from sar_ray.config import EvalConfig, NormalizationConfig
from sar_ray.metrics import caption_for_clip
from sar_ray.metrics.families import (
    CI_LEVEL,
    METRIC_DIRECTION,
    Context,
    Family,
    SetView,
    bootstrap_counts,
    bootstrap_intervals,
    flat_intervals,
    metric_direction,
    requested,
)

if TYPE_CHECKING:  # torch/open_clip load only when the clip family is asked for
    from sar_ray.metrics.clip import SarClip

# CLIP-free runs (and every Ray worker of the CPU step) never import torch.
CLIP_CONFIG_NAME = "open_clip_config.json"
#: A sample folder written by sar-ray holds this file: its images are model output in [0, 1].
SAMPLES_MARKER = "samples.json"

SETS = ("generated", "reference")

__all__ = [
    "METRIC_DIRECTION", "SAMPLES_MARKER", "EvalResult", "describe_images", "evaluate", "generated_normalization",
    "is_model_output", "list_images", "mark_model_output", "metric_direction", "score", "score_arrays",
]


@dataclass
class EvalResult:
    """Aggregates of one evaluation and where they were written.

    metrics: point values; intervals: ``{metric: (lo, hi)}`` 95% bootstrap intervals (empty
    with ``bootstrap: 0``); normalization: per set, the method used and why."""

    metrics: dict[str, float]
    n_generated: int
    n_reference: int
    size: tuple[int, int]
    metrics_path: Path | None = None
    per_image_path: Path | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    normalization: dict[str, dict[str, str]] = field(default_factory=dict)

    def flat(self) -> dict[str, float]:
        """Point values and interval bounds as one ``{name: float}`` (MLflow / Tune metrics)."""
        return {**self.metrics, **flat_intervals(self.intervals)}


# ------------------------------------------------------------------------------- model output


def mark_model_output(folder: str | os.PathLike, **info: Any) -> Path:
    """Declare `folder` a sar-ray sample folder (its images are model output, [0, 1] amplitude)."""
    path = Path(folder) / SAMPLES_MARKER
    doc = {"producer": "sar-ray", "kind": "samples", "amplitude": "[0, 1], normalised as in training; "
           "16-bit PNG value / 65535, float TIFF as is", **info}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def is_model_output(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder that sar-ray's sampler wrote (it holds :data:`SAMPLES_MARKER`)."""
    return _marker(path) is not None


def _marker(path: str | os.PathLike) -> dict | None:
    """The :data:`SAMPLES_MARKER` document of a sar-ray sample folder, else None."""
    try:
        doc = json.loads((Path(path).expanduser() / SAMPLES_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("producer") == "sar-ray" else None


#: The settings each normalisation method reads (the others do not change its images).
_NORM_READS = {"reference": ("k",), "db": ("db_min", "db_max"), "percentile": ("p_low", "p_high"), "none": ("bits",)}


def _norm_label(n: NormalizationConfig) -> str:
    args = ", ".join(f"{f}={getattr(n, f):g}" for f in _NORM_READS[n.method] if getattr(n, f) is not None)
    return f"{n.method}({args + ', ' if args else ''}{n.input})"


def _training_normalization_warning(generated: str | os.PathLike, reference_norm: NormalizationConfig) -> list[str]:
    """A warning when a sample folder's model learned another normalisation than the one the
    reference gets: the distances would then measure that difference as well."""
    trained = (_marker(generated) or {}).get("normalization")
    if not isinstance(trained, dict):
        return []  # written before samples.json recorded it, or by a caller that did not say
    try:
        trained_norm = NormalizationConfig.model_validate(trained)
    except ValueError:
        return [f"generated: {SAMPLES_MARKER} has an unreadable normalization {trained!r}; cannot check that "
                "the reference is normalised as the model's training images were"]
    if _norm_label(trained_norm) == _norm_label(reference_norm):
        return []
    # --normalization sets the method only: it is the fix where the training used its defaults.
    plain = _norm_label(trained_norm) == _norm_label(NormalizationConfig(method=trained_norm.method))
    fix = f"--config STUDY.yaml{f', or --normalization {trained_norm.method}' if plain else ''}"
    return [f"generated: the model was trained on images normalised by {_norm_label(trained_norm)} "
            f"({SAMPLES_MARKER}) but the reference is normalised by {_norm_label(reference_norm)}, so the "
            f"distances also measure that difference; evaluate with the training's normalisation ({fix})"]


_MODEL_OUTPUT = "model output (rescaled to [0, 1] only)"


def generated_normalization(generated: str | os.PathLike, cfg: EvalConfig) -> tuple[NormalizationConfig, dict[str, str]]:
    """How the generated set is normalised: (config, {"method", "as", "why"})."""
    setting = cfg.generated_normalized
    if setting == "auto":
        model_output = is_model_output(generated)
        why = (f"{SAMPLES_MARKER}: a sar-ray sample folder" if model_output else
               f"no {SAMPLES_MARKER}: not a sar-ray sample folder (--generated-is-model-output to override)")
    else:
        model_output = bool(setting)
        why = f"eval.generated_normalized: {str(model_output).lower()}"
    if model_output:
        return NormalizationConfig(method="none"), {"method": "none", "as": _MODEL_OUTPUT, "why": why}
    return cfg.normalization, {"method": cfg.normalization.method, "as": "like the reference", "why": why}


# ------------------------------------------------------------------------------- public API


def score(generated: str | os.PathLike, reference: str | os.PathLike, cfg: EvalConfig) -> dict[str, float]:
    """Flat ``{name: value}`` of `generated` against `reference` (what a sweep logs): each
    metric's value and its interval bounds ``<metric>.ci_lo`` / ``<metric>.ci_hi``."""
    return evaluate(generated, reference, cfg, out=None, progress=False).flat()


def evaluate(
    generated: str | os.PathLike,
    reference: str | os.PathLike,
    cfg: EvalConfig,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    reference_columns: tuple | None = None,
    skip_unreadable_reference: bool = False,
    require_prompts: bool = True,
) -> EvalResult:
    """Score two image sets with Ray Data; write ``metrics.json`` + per-image Parquet if `out`.

    `reference` may also be WebDataset shards (a ``.tar``, a folder, a brace pattern, an
    ``s3://`` prefix); `reference_columns` = (image_column, text_column) name their image
    member and caption (a study's `data` section; default: the first ``.npy``/``.png``, no captions).

    `out`: a ``.json`` path (Parquet next to it as ``<stem>_per_image.parquet``) or a folder
    (``metrics.json`` and ``metrics_per_image.parquet`` inside). Raises ``DataError`` /
    ``ImageReadError`` for unusable input, naming the file; with `skip_unreadable_reference`
    (a sweep whose data.on_corrupt is skip) an unreadable reference image is left out of the
    reference and counted in a warning instead. With `require_prompts` False (a sweep's real
    anchor: held-out images need not be captioned) a generated set without prompts gets clip's
    image distances (clip/fd, clip/kid) and a warning instead of a refusal.
    """
    import ray

    warnings: list[str] = []
    gen_items, w = list_images(generated, "generated", cfg.max_images, seed=cfg.seed)
    warnings += w
    ref_items, w = list_images(reference, "reference", cfg.max_images, reference_columns, seed=cfg.seed)
    warnings += w
    clip_path = _check_clip_inputs(cfg, gen_items, generated, require_prompts)
    if clip_path is not None:
        cfg = cfg.model_copy(update={"clip": str(clip_path)})  # absolute: workers run elsewhere
    _assign_classes(gen_items, ref_items)
    size = _target_size(cfg, ref_items, skip_unreadable_reference)
    gen_norm, gen_how = generated_normalization(generated, cfg)
    norms = {"generated": gen_norm, "reference": cfg.normalization}
    normalization = {"generated": gen_how, "reference": {"method": cfg.normalization.method, "as": "eval.normalization",
                                                         "why": "the reference is real SAR"}}
    if gen_how["as"] == _MODEL_OUTPUT:  # in the space of the training's normalisation
        warnings += _training_normalization_warning(generated, cfg.normalization)
    families = requested(cfg.metrics)

    if not ray.is_initialized():
        # Local Ray by default (RAY_ADDRESS, if set, joins a cluster); quiet: the CLI prints.
        from .train import ray_address

        ray.init(address=ray_address(None), include_dashboard=False, log_to_driver=False, configure_logging=False)
    # The reference is described once per (reference, describing settings): a hit scores only
    # the generated images.
    cache = _ReferenceCache.for_reference(cfg, ref_items, size)
    skipped: list[tuple[int, str, str]] = []  # (index, name, error) of unreadable reference images left out
    cached = (cache.load(families, len(ref_items), warnings, skipped if skip_unreadable_reference else None,
                         unreadable=lambda i: _unreadable(ref_items[i], cfg.normalization, size))
              if cache is not None else None)
    items = [it.row() for it in (gen_items if cached is not None else gen_items + ref_items)]
    counts, w = _resample_plan(len(gen_items), cfg)
    warnings += w
    with _quiet_ray_data():
        ds = _pipeline(items, cfg, size, norms, families)
        accs = {"generated": _SetAccumulator(families, counts, _bootstrap_classes(gen_items, ref_items)),
                "reference": cached if cached is not None else _SetAccumulator(families)}
        described = ("generated",) if cached is not None else SETS
        with _progress(len(items), progress) as advance:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                usable = np.ones(len(batch["set"]), bool)
                if skip_unreadable_reference:
                    # A DepthError is the config's mistake (data.normalization.bits), not a bad file.
                    depth = np.asarray([str(e).startswith("DepthError:") for e in batch["error"]], bool)
                    usable = ~((batch["set"] == "reference") & (batch["error"] != "") & ~depth)
                    skipped += [(int(i), str(n), str(e)) for i, n, e in
                                zip(batch["index"][~usable], batch["name"][~usable], batch["error"][~usable])]
                    batch["error"] = np.where(usable, batch["error"], "")
                _raise_unreadable(batch)  # the first unreadable image stops the run
                for s in described:
                    accs[s].add(batch, (batch["set"] == s) & usable)
                advance(len(batch["set"]))
    if skipped:
        warnings.append(f"reference: left out {len(skipped)} unreadable of {len(ref_items)} images "
                        f"(data.on_corrupt=skip; first: {skipped[0][1]}: {skipped[0][2]})")
    if accs["reference"].n == 0:
        from sar_ray.data.captions import DataError

        raise DataError(f"{reference}: no readable reference images (all {len(ref_items)} unreadable)")
    if cache is not None and cached is None:
        cache.save(accs["reference"], warnings, skipped)

    warnings += _input_warnings(accs, size)
    models = {}
    if clip_path is not None:
        models = {f.name: f.load(cfg, "cpu") for f in families if f.load is not None}
    agg = _aggregate(families, accs["generated"], accs["reference"], cfg, models)
    warnings += agg.warnings
    agg.summary["size"] = list(size)
    if cache is not None:
        agg.summary["reference_cache"] = {"hit": cached is not None, "key": cache.key, "path": str(cache.path)}
    result = EvalResult(agg.metrics, accs["generated"].n, accs["reference"].n, size, summary=agg.summary,
                        warnings=warnings, intervals=agg.intervals, normalization=normalization)
    if out is not None:
        _write(result, agg.per_image, Path(out), generated, reference, cfg)
    return result


def _pipeline(items: list[dict], cfg: EvalConfig, size: tuple[int, int], norms: dict, families: list[Family]):
    """The lazy Ray Data dataset of per-image descriptor rows (every requested family's)."""
    import ray

    ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / cfg.batch_size)))
    with_model = [f for f in families if f.load is not None]
    gpus = int(ray.cluster_resources().get("GPU", 0)) if with_model else 0
    kwargs = {"cfg": cfg, "size": size, "norms": norms}
    if with_model and not gpus:
        # CPU only: describe and embed in the same actors, as many as there are CPUs (two
        # operators would be fused by Ray Data into one actor anyway, i.e. run serially).
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        return ds.map_batches(
            _DescribeWithModels, fn_constructor_kwargs=kwargs,
            batch_size=cfg.batch_size, batch_format="numpy", concurrency=(1, cpus), num_cpus=1,
        )
    ds = ds.map_batches(
        _describe_batch, fn_kwargs={**kwargs, "keep_images": bool(with_model)},
        batch_size=cfg.batch_size, batch_format="numpy", num_cpus=1,
    )
    if with_model:
        # One actor per GPU, loading the models once; the CPU step above stays tasks.
        ds = ds.map_batches(
            _ModelDescriber, fn_constructor_kwargs={"cfg": cfg, "device": "cuda"},
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
    """The same metrics (and interval bounds, as :func:`score`) on in-memory [0, 1] images,
    without Ray or files (notebooks, quick in-training checks: ``bootstrap=0`` skips the
    intervals). Each set's images share one shape; `prompts` and a loaded `clip` (default:
    ``cfg.clip``) are needed for the ``clip`` family."""
    families = requested(cfg.metrics)
    models: dict[str, Any] = {}
    if "clip" in cfg.metrics:
        if clip is None:
            if cfg.clip is None:
                raise ValueError("metrics include clip: pass clip= or set eval.clip")
            from sar_ray.metrics.clip import load_clip

            clip = load_clip(cfg.clip)
        models["clip"] = clip
    accs = {}
    for name, images in (("generated", generated), ("reference", reference)):
        arr = np.asarray(images, dtype=np.float32)
        if arr.ndim != 3 or len(arr) == 0:
            raise ValueError(f"{name}: expected a non-empty (N, H, W) stack of images, got shape {arr.shape}")
        batch = describe_images(arr, cfg, families, models)
        texts = list(prompts) if (name == "generated" and prompts is not None) else [""] * len(arr)
        batch.update(_meta_columns(name, len(arr), texts, arr.shape[1:]))
        counts = _resample_plan(len(arr), cfg)[0] if name == "generated" else None
        accs[name] = _SetAccumulator(families, counts)
        accs[name].add(batch, np.ones(len(arr), bool))
    if "clip" in cfg.metrics and (prompts is None or len(prompts) != accs["generated"].n):
        raise ValueError("metrics include clip: give one prompt per generated image")
    agg = _aggregate(families, accs["generated"], accs["reference"], cfg, models)
    return {**agg.metrics, **flat_intervals(agg.intervals)}


def _meta_columns(role: str, n: int, texts: list[str], shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    return {
        "set": np.full(n, role, dtype=object), "index": np.arange(n), "text": np.array(texts, dtype=object),
        "name": np.array([f"{role}[{i}]" for i in range(n)], dtype=object),
        "label": np.array([None] * n, dtype=object), "resized": np.zeros(n, bool),
        "height": np.full(n, shape[0]), "width": np.full(n, shape[1]), "depth": np.full(n, 32),
    }


def _bootstrap_classes(gen_items: list[_Item], ref_items: list[_Item]) -> set[str]:
    """The classes that get per-class intervals: bounded memory (B x 4096 bins each), so past
    the first few (sorted: the same whatever order batches arrive in) a class keeps its value
    but gets no interval (nan)."""
    common = {it.label for it in gen_items if it.label} & {it.label for it in ref_items if it.label}
    return set(sorted(common)[:_MAX_BOOTSTRAP_CLASSES])


def _resample_plan(n: int, cfg: EvalConfig) -> tuple[np.ndarray | None, list[str]]:
    """Bootstrap draws of the generated images ((B, n) counts), or None; and warnings."""
    if cfg.bootstrap == 0:
        return None, []
    if n < 2:
        return None, [f"no bootstrap intervals: {n} generated image (they need >= 2)"]
    return bootstrap_counts(n, cfg.bootstrap, cfg.seed), []


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


def list_images(path: str | os.PathLike, role: str, max_images: int | None = None,
                columns: tuple | None = None, seed: int = 0) -> tuple[list[_Item], list[str]]:
    """The images of one set, without decoding: a caption table's rows, or a folder's images.

    A folder with ``metadata.jsonl`` (or one CSV/Parquet table) is read with the training
    readers; a folder of plain images is listed recursively (sorted; the first subfolder name
    is the label, as in Hugging Face imagefolder). `max_images`: a sample of that many,
    stratified by label and seeded by `seed` (:func:`stratified_sample`); WebDataset shards: the
    first that many in shard order. Returns (items, warnings).
    """
    from sar_ray.data.captions import TABLE_EXTENSIONS, DataError, read_table
    from sar_ray.data.io import IMAGE_EXTENSIONS
    from sar_ray.data.webdataset import list_streamed

    # WebDataset: members named, not read. The listing stops at the first `max_images` in shard
    # order: every member header is a read (on object storage a request), shard samples carry no
    # label to stratify by, and shards are written shuffled.
    shards = list_streamed(path, max_images, columns)
    if shards is not None:
        return [_Item(role, i, r.path, r.image_bytes, r.name, r.text, r.label) for i, r in enumerate(shards)], []
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
    return stratified_sample(items, max_images, seed), warnings


def stratified_sample(items: list[_Item], n: int | None, seed: int) -> list[_Item]:
    """`n` of `items`, drawn per label (unlabelled images are one more group) in proportion to
    the label's count, at least one per label where `n` allows; seeded, so the same listing and
    seed give the same images. The first N of a sorted listing would be one class when classes
    are folders. Kept in listing order and re-indexed 0..n-1 (the index orders per-image rows)."""
    if n is None or n >= len(items):
        return items
    groups: dict[str | None, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        groups[it.label].append(i)
    labels = sorted(groups, key=lambda lab: (lab is None, lab or ""))  # a fixed order for the draws
    quota = _quotas([len(groups[lab]) for lab in labels], n)
    rng = np.random.default_rng([seed % 2**63, len(items), n])
    picked = sorted(int(groups[lab][j]) for lab, q in zip(labels, quota)
                    for j in rng.permutation(len(groups[lab]))[:q])
    return [replace(items[i], index=k) for k, i in enumerate(picked)]


def _quotas(sizes: list[int], n: int) -> list[int]:
    """Images per group for a sample of n < sum(sizes): proportional shares (largest remainder),
    then every group at least one while n covers them, taken from the best-served groups."""
    total = sum(sizes)
    share = [n * s / total for s in sizes]
    q = [math.floor(x) for x in share]
    for g in sorted(range(len(sizes)), key=lambda g: q[g] - share[g])[: n - sum(q)]:
        q[g] += 1  # largest remainders first (a stable sort: ties go to the earlier label)
    if n >= len(sizes):
        for g in (g for g in range(len(sizes)) if q[g] == 0):
            donor = max((d for d in range(len(sizes)) if q[d] > 1), key=lambda d: q[d] - share[d])
            q[donor] -= 1
            q[g] = 1
    return q


def _check_clip_inputs(cfg: EvalConfig, gen_items: list[_Item], generated, require_prompts: bool = True) -> Path | None:
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
    if missing and require_prompts:
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


def _target_size(cfg: EvalConfig, ref_items: list[_Item], skip_unreadable: bool = False) -> tuple[int, int]:
    """eval.size, else the first reference image's size (the first readable one when
    unreadable reference images are skipped)."""
    from sar_ray.data.io import ImageReadError

    if cfg.size is not None:
        return (cfg.size, cfg.size)
    for i, it in enumerate(ref_items):
        try:
            return tuple(int(v) for v in _decode(it.path, it.image_bytes, it.name)[0].shape)
        except ImageReadError:
            if not skip_unreadable or i == len(ref_items) - 1:
                raise
    raise AssertionError("unreachable: list_images refuses an empty reference")


# ------------------------------------------------------------------------------- workers


def _unreadable(it: _Item, norm: NormalizationConfig, size: tuple[int, int]) -> bool:
    """Whether describing would leave `it` out (`_describe_batch`'s test, on the driver)."""
    from sar_ray.data.captions import DataError
    from sar_ray.data.io import ImageReadError
    from sar_ray.data.normalize import DepthError

    try:
        load_image(it.path, it.image_bytes, it.name, norm, size)
    except DepthError:
        return False  # it reads: the entry is stale, and describing again raises the config's mistake
    except (ImageReadError, DataError):
        return True
    return False


def _decode(path: str | None, data: bytes | None, name: str) -> tuple[np.ndarray, int | None]:
    """(linear pixels, stored bit depth): see `io.read_pixels`."""
    from sar_ray.data.io import read_pixels, read_pixels_bytes

    if isinstance(data, (bytes, bytearray, memoryview)) and len(data):
        return read_pixels_bytes(bytes(data), path if isinstance(path, str) else name)
    return read_pixels(path)


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


def _bit_depth(pixels: np.ndarray, bits: int | None) -> int:
    """8, 16 or 32 (float): the precision the decoded values were stored with; the file's
    own depth where it stored integers (a dark 16-bit image is 16-bit), else from the values."""
    if bits is not None:
        return bits
    vmin, vmax = float(pixels.min()), float(pixels.max())
    if vmin >= 0 and np.all(pixels == np.round(pixels)):
        if vmax <= 255:
            return 8
        if vmax <= 65535:
            return 16
    return 32


def load_image(path, data, name, norm: NormalizationConfig, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int], int]:
    """Decode, normalise with `norm` and fit one image to `size`: (image, stored shape, bit depth)."""
    from sar_ray.data.normalize import normalize

    pixels, bits = _decode(path, data, name)
    return _fit(normalize(pixels, norm, bits, name), size), tuple(pixels.shape), _bit_depth(pixels, bits)


def describe_images(images: np.ndarray, cfg: EvalConfig, families: Sequence[Family] | None = None,
                    models: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Per-image descriptors of (N, H, W) [0, 1] images: ``{"<family>/<column>": (N, ...)}``
    for `families` (default: the model-free ones of ``cfg.metrics``); a family with a model
    needs it in ``models[name]``."""
    if families is None:
        families = [f for f in requested(cfg.metrics) if f.load is None]
    out: dict[str, np.ndarray] = {}
    for f in families:
        for col, v in f.describe(images, cfg, (models or {}).get(f.name)).items():
            out[f"{f.name}/{col}"] = v
    return out


def _cell(value, kind):
    # Ray Data turns an all-null column into NaN in numpy batches: anything else is "absent".
    return value if isinstance(value, kind) else None


def _describe_batch(batch: dict[str, np.ndarray], cfg: EvalConfig, size: tuple[int, int], norms: dict,
                    keep_images: bool):
    from sar_ray.data.captions import DataError
    from sar_ray.data.io import ImageReadError

    images, shapes, depths, errors = [], [], [], []
    for i in range(len(batch["set"])):
        try:
            img, shape, depth = load_image(
                _cell(batch["path"][i], str), _cell(batch["image_bytes"][i], (bytes, bytearray)),
                str(batch["name"][i]), norms[str(batch["set"][i])], size,
            )
            err = ""
        except (ImageReadError, DataError) as e:
            # Returned, not raised: Ray loses the exception type on the way to the driver,
            # which raises it (with the file name) so the CLI exits 2 with one clear line.
            img, shape, depth, err = np.zeros(size, np.float32), size, 32, f"{type(e).__name__}: {e}"
        images.append(img)
        shapes.append(shape)
        depths.append(depth)
        errors.append(err)
    arr = np.stack(images)  # (B, H, W) float32 in [0, 1]
    out = describe_images(arr, cfg)
    out["error"] = np.asarray(errors, dtype=object)
    for key in ("set", "index", "name", "text"):
        out[key] = np.asarray(batch[key], dtype=object if key != "index" else np.int64)
    out["label"] = np.asarray([_cell(v, str) for v in batch["label"]], dtype=object)
    out["height"] = np.asarray([s[0] for s in shapes], np.int64)
    out["width"] = np.asarray([s[1] for s in shapes], np.int64)
    out["resized"] = np.asarray([tuple(s) != tuple(size) for s in shapes], bool)
    out["depth"] = np.asarray(depths, np.int64)
    if keep_images:
        out["image"] = arr
    return out


class _ModelDescriber:
    """Ray Data actor: the descriptors of the families with a model (SAR-CLIP embeddings),
    each model loaded once per actor."""

    def __init__(self, cfg: EvalConfig, device: str):
        if device == "cpu":
            import torch

            torch.set_num_threads(1)  # one CPU per actor, as Ray reserved
        self.cfg = cfg
        self.families = [f for f in requested(cfg.metrics) if f.load is not None]
        self.models = {f.name: f.load(cfg, device) for f in self.families}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = dict(batch)
        batch.update(describe_images(batch.pop("image"), self.cfg, self.families, self.models))
        return batch


class _DescribeWithModels(_ModelDescriber):
    """CPU-only Ray Data actor: the descriptors of :func:`_describe_batch`, then the models'."""

    def __init__(self, cfg: EvalConfig, size: tuple[int, int], norms: dict):
        super().__init__(cfg, "cpu")
        self.size, self.norms = size, norms

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return super().__call__(_describe_batch(batch, self.cfg, self.size, self.norms, keep_images=True))


# ------------------------------------------------------------------------------- driver

_META = ("set", "index", "name", "text", "label", "resized", "height", "width", "depth")
_MAX_BOOTSTRAP_CLASSES = 32


class _SetAccumulator:
    """One set's descriptors, gathered batch by batch on the driver (batches arrive in any
    order): per-image columns as rows; a family's pooled columns (histograms) as sums, per
    class, and per bootstrap resample when `counts` ((B, N) draws per image) is given, so the
    driver never holds a histogram per image."""

    def __init__(self, families: Sequence[Family], counts: np.ndarray | None = None,
                 boot_classes: set[str] | None = None):
        # boot_classes: the classes whose per-resample sums are kept (None: all).
        self.boot_classes = boot_classes
        self.prefixes = tuple(f"{f.name}/" for f in families)
        self.pooled = {f"{f.name}/{c}" for f in families for c in f.pooled}
        self.counts = counts
        self.sums: dict[str, np.ndarray] = {}
        self.class_sums: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
        self.boot: dict[str, np.ndarray] = {}  # key -> (B, ...) sums of each resample
        self.class_boot: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
        self.cols: dict[str, list[np.ndarray]] = defaultdict(list)
        self.rows: list[dict] = []  # per-image metadata (no pixels)
        self._order: np.ndarray | None = None

    @property
    def n(self) -> int:
        return len(self.rows)

    def add(self, batch: dict[str, np.ndarray], mask: np.ndarray) -> None:
        if not mask.any():
            return
        self._order = None
        idx = np.asarray(batch["index"])[mask].astype(np.int64)
        labels = np.asarray(batch["label"], dtype=object)[mask]
        classes = {lab: labels == lab for lab in set(v for v in labels if isinstance(v, str))}
        for key in (k for k in batch if k.startswith(self.prefixes)):
            values = np.asarray(batch[key])[mask]
            if key not in self.pooled:
                self.cols[key].extend(values)
                continue
            _add(self.sums, key, _sum(values))
            for lab, sel in classes.items():
                _add(self.class_sums[lab], key, _sum(values[sel]))
            if self.counts is not None:
                w = self.counts[:, idx].astype(np.float64)  # (B, n) draws of these images
                flat = values.reshape(len(values), -1).astype(np.float64)
                shape = (len(w), *values.shape[1:])
                _add(self.boot, key, (w @ flat).reshape(shape))
                for lab, sel in classes.items():
                    if self.boot_classes is None or lab in self.boot_classes:
                        _add(self.class_boot[lab], key, (w[:, sel] @ flat[sel]).reshape(shape))
        for i in np.flatnonzero(mask):
            row = {k: batch[k][i] for k in _META}
            self.rows.append({
                "set": str(row["set"]), "index": int(row["index"]), "name": str(row["name"]),
                "text": str(row["text"] or ""), "label": _cell(row["label"], str), "resized": bool(row["resized"]),
                "height": int(row["height"]), "width": int(row["width"]), "depth": int(row["depth"]),
            })

    def ordered_rows(self) -> list[dict]:
        return [self.rows[i] for i in self._sorted()]

    def state(self) -> tuple[dict, list[np.ndarray]]:
        """What this set holds (not its resamples), as a JSON-able manifest and arrays: what
        the reference cache stores. `from_state` rebuilds it."""
        layout, arrays = [], []
        for key, v in self.sums.items():
            layout.append(["sums", None, key])
            arrays.append(v)
        for lab, d in self.class_sums.items():
            for key, v in d.items():
                layout.append(["class", lab, key])
                arrays.append(v)
        for key, v in self.cols.items():
            layout.append(["cols", None, key])
            arrays.append(np.stack(v))  # (N, ...) in arrival order, as rows
        return {"arrays": layout, "rows": self.rows}, arrays

    @classmethod
    def from_state(cls, families: Sequence[Family], manifest: dict, arrays: list[np.ndarray]) -> _SetAccumulator:
        acc = cls(families)
        for (kind, lab, key), a in zip(manifest["arrays"], arrays, strict=True):
            if not key.startswith(acc.prefixes):
                raise ValueError(f"column {key!r} of a family not asked for")
            if kind == "sums":
                acc.sums[key] = a
            elif kind == "class":
                acc.class_sums[lab][key] = a
            else:
                acc.cols[key] = list(a)
        acc.rows = list(manifest["rows"])
        return acc

    def _sorted(self) -> np.ndarray:
        if self._order is None:
            self._order = np.argsort([r["index"] for r in self.rows], kind="stable")
        return self._order

    def view(self, family: Family, resample: int | None = None) -> SetView:
        """What `family` sees of this set: all images, or bootstrap resample `resample`."""
        order, prefix = self._sorted(), f"{family.name}/"
        columns = {k[len(prefix):]: np.asarray(v)[order] for k, v in self.cols.items() if k.startswith(prefix)}
        rows = self.ordered_rows()
        text = np.array([r["text"] for r in rows], dtype=object)
        label = np.array([r["label"] for r in rows], dtype=object)

        def own(d: dict[str, np.ndarray], pick=lambda v: v) -> dict[str, np.ndarray]:
            return {k[len(prefix):]: pick(v) for k, v in d.items() if k.startswith(prefix)}

        if resample is None:
            return SetView(self.n, columns, own(self.sums),
                           {lab: own(d) for lab, d in self.class_sums.items()}, text, label)
        take = np.repeat(np.arange(self.n), self.counts[resample])  # rows drawn, with repeats
        pick = lambda v: v[resample]  # noqa: E731
        return SetView(self.n, {k: v[take] for k, v in columns.items()}, own(self.boot, pick),
                       {lab: own(d, pick) for lab, d in self.class_boot.items()}, text[take], label[take])


def _sum(values: np.ndarray) -> np.ndarray:
    return values.sum(axis=0, dtype=np.int64 if np.issubdtype(values.dtype, np.integer) else np.float64)


def _add(store: dict[str, np.ndarray], key: str, value: np.ndarray) -> None:
    store[key] = store[key] + value if key in store else value


# ------------------------------------------------------------------------------- reference cache

#: Bump when what a family's `describe` returns for an image changes without its source
#: changing (a dependency's behaviour, say): every cached reference is then described again.
DESCRIPTOR_VERSION = 1
#: Settings read only on the driver (aggregate, bootstrap, Ray Data batching) or already in the
#: listing (max_images, seed pick the images): changing them reuses the cached reference.
_DRIVER_ONLY = frozenset({"cache_dir", "generated_normalized", "hist_smoothing", "per_class", "batch_size",
                          "clip_batch_size", "kid_subset_size", "kid_subsets", "bootstrap", "seed", "max_images"})
#: Sources whose code decides a reference descriptor: any edit of them misses the cache.
_DESCRIPTOR_SOURCES = ("evaluate.py", "metrics", "data/io.py", "data/normalize.py", "data/dataset.py")
_CACHE_KEEP = 32  # entries kept per cache folder (least recently used go first)
#: An entry's left-out images are read again on a load at most this often (seconds since the
#: entry was written or last rechecked: its mtime): a sweep loads the entry once per trial.
_RECHECK_S = 600.0


class _ReferenceCache:
    """The reference set's described state (a `_SetAccumulator` without resamples: pooled
    sums, per-class sums, per-image columns, row metadata) under ``eval.cache_dir``, keyed by
    everything that decides it: the listed files (path, size, mtime; embedded bytes by their
    hash), the describing settings (normalisation, compared size, families and their
    parameters, the SAR-CLIP folder's files), the descriptor code and `DESCRIPTOR_VERSION`.
    A hit skips decoding and describing the reference. An entry is trusted only if its stored
    key equals this one and its arrays hash to the digest written with them; anything else is
    described again, with a warning. An entry that left unreadable images out (with
    `skip_unreadable_reference`) says which, so a hit warns about them as describing did, and
    serves only callers that skip them too (the others describe again, and stop at the first)."""

    def __init__(self, folder: Path, key_doc: dict):
        self.key_doc = key_doc
        self.key = _sha256(json.dumps(key_doc, sort_keys=True).encode())[:24]
        self.path = folder / f"reference-{self.key}.npz"

    @classmethod
    def for_reference(cls, cfg: EvalConfig, ref_items: list[_Item], size: tuple[int, int]) -> _ReferenceCache | None:
        if not cfg.cache_dir:
            return None
        settings = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in _DRIVER_ONLY}
        key_doc = {"version": DESCRIPTOR_VERSION, "code": _descriptor_code_digest(), "numpy": np.__version__,
                   "size": list(size), "settings": settings, "reference": _listing_digest(ref_items),
                   "n": len(ref_items)}
        if "clip" in cfg.metrics and cfg.clip:
            key_doc["clip_files"] = _folder_digest(Path(cfg.clip))
        return cls(Path(cfg.cache_dir).expanduser(), key_doc)

    def load(self, families: Sequence[Family], n: int, warnings: list[str],
             skipped: list | None = None, unreadable: Callable[[int], bool] | None = None
             ) -> _SetAccumulator | None:
        """The cached reference, or None. `skipped`: the list to extend with the entry's
        left-out images (None: an entry that left any out is not used). `unreadable(index)`
        reads a left-out image again: one that reads now (the error was passing: a storage
        hiccup, a permission fixed) makes the entry stale. The images are read again only when
        the entry was written or last rechecked over `_RECHECK_S` ago (its mtime records
        that, and orders the pruning), so a sweep does not read them once per trial."""
        try:
            recheck = time.time() - self.path.stat().st_mtime > _RECHECK_S
        except OSError:  # none (or another process pruned it just now)
            return None
        try:
            with np.load(self.path, allow_pickle=False) as z:
                manifest = json.loads(str(z["manifest"]))
                arrays = [z[f"a{i}"] for i in range(len(manifest["arrays"]))]
            if manifest.get("key") != self.key_doc:
                raise ValueError("written for another reference, eval config or descriptor code")
            if manifest.get("digest") != _arrays_digest(arrays):
                raise ValueError("its arrays do not match the digest written with them")
            acc = _SetAccumulator.from_state(families, manifest, arrays)
            left_out = [tuple(x) for x in manifest.get("skipped", [])]
            if sorted([r["index"] for r in acc.rows] + [x[0] for x in left_out]) != list(range(n)):
                raise ValueError(f"it holds {acc.n} images and {len(left_out)} left out, the reference {n}")
            if left_out and skipped is None:
                return None  # this caller reads every image: describing stops at the first unreadable
            if left_out and recheck and unreadable is not None:
                readable = next((x[1] for x in left_out if not unreadable(x[0])), None)
                if readable is not None:
                    raise ValueError(f"{readable}, left out as unreadable, reads now")
        except Exception as e:  # noqa: BLE001 - whatever is wrong with it, describing again is right
            warnings.append(f"reference cache {self.path}: not used ({type(e).__name__}: {e}); "
                            "the reference was described again")
            return None
        # Recently used: pruned last. An entry with left-out images is touched only when they are
        # rechecked (its mtime says when), so pruning may see it up to _RECHECK_S older than it is.
        if recheck or not left_out:
            with contextlib.suppress(OSError):  # pruned meanwhile by another process: we hold its arrays
                os.utime(self.path)
        if skipped is not None:
            skipped += left_out
        return acc

    def save(self, acc: _SetAccumulator, warnings: list[str], skipped: list | None = None) -> None:
        manifest, arrays = acc.state()
        manifest["skipped"] = [list(x) for x in skipped or []]
        if any(a.dtype == object for a in arrays):
            warnings.append("reference cache: not written (a descriptor column holds Python objects)")
            return
        manifest.update(key=self.key_doc, digest=_arrays_digest(arrays))
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                np.savez(f, manifest=np.array(json.dumps(manifest)), **{f"a{i}": a for i, a in enumerate(arrays)})
            os.replace(tmp, self.path)  # readers see the old entry or the whole new one
            self._prune()
        except OSError as e:
            tmp.unlink(missing_ok=True)
            warnings.append(f"reference cache {self.path.parent}: not written ({e})")

    def _prune(self) -> None:
        entries = sorted(self.path.parent.glob("reference-*.npz"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in entries[_CACHE_KEEP:]:
            old.unlink(missing_ok=True)


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _listing_digest(items: list[_Item]) -> str:
    """One hash over what each reference image is: its row (index, name, caption, label, path)
    and the file's size and mtime (a shard member: its shard's), or its embedded bytes."""
    import hashlib

    h, stats = hashlib.sha256(), {}
    for it in items:
        where = it.path.split("!", 1)[0] if isinstance(it.path, str) else None
        if where is not None and "://" not in where and where not in stats:
            try:
                st = os.stat(where)
                stats[where] = [st.st_size, st.st_mtime_ns]
            except OSError:
                stats[where] = None
        content = hashlib.blake2b(bytes(it.image_bytes)).hexdigest() if it.image_bytes else stats.get(where)
        h.update(json.dumps([it.index, it.name, it.text, it.label, it.path, content]).encode() + b"\n")
    return h.hexdigest()


def _folder_digest(folder: Path) -> str:
    rows = []
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            rows.append([str(p.relative_to(folder)), st.st_size, st.st_mtime_ns])
    return _sha256(json.dumps(rows).encode())


_CODE_DIGEST: str | None = None


def _descriptor_code_digest() -> str:
    global _CODE_DIGEST
    if _CODE_DIGEST is None:
        root = Path(__file__).parent
        files = sorted(p for s in _DESCRIPTOR_SOURCES for p in ([root / s] if s.endswith(".py") else
                                                                   (root / s).rglob("*.py")))
        _CODE_DIGEST = _sha256(b"".join(p.name.encode() + p.read_bytes() for p in files))
    return _CODE_DIGEST


def _arrays_digest(arrays: list[np.ndarray]) -> str:
    import hashlib

    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


@dataclass
class _Aggregated:
    metrics: dict[str, float]
    intervals: dict[str, tuple[float, float]]
    summary: dict[str, Any]
    per_image: list[dict]
    warnings: list[str]


def _aggregate(families: Sequence[Family], gen: _SetAccumulator, ref: _SetAccumulator, cfg: EvalConfig,
               models: dict[str, Any]) -> _Aggregated:
    """Every family's metrics from the two sets' descriptors, then the bootstrap intervals
    (the same ``aggregate`` on each resample of the generated images)."""
    metrics: dict[str, float] = {}
    summary: dict[str, Any] = {}
    warnings: list[str] = []
    columns: dict[str, dict[str, np.ndarray]] = {s: {} for s in SETS}
    # A family with a model but none loaded (clip without a model): skipped, as before.
    families = [f for f in families if f.load is None or f.name in models]
    ctxs = {f.name: Context(model=models.get(f.name)) for f in families}
    ref_views = {f.name: ref.view(f) for f in families}
    for f in families:
        agg = f.aggregate(gen.view(f), ref_views[f.name], cfg, ctxs[f.name])
        metrics.update(agg.metrics)
        summary.update(agg.summary)
        warnings += agg.warnings
        for s, cols in agg.per_image.items():
            columns[s].update(cols)

    intervals: dict[str, tuple[float, float]] = {}
    if gen.counts is not None and len(gen.counts):
        def resample(b: int) -> dict[str, float]:
            out: dict[str, float] = {}
            for f in families:
                ctx = replace(ctxs[f.name], resample=True)  # shares the cache
                out.update(f.aggregate(gen.view(f, b), ref_views[f.name], cfg, ctx).metrics)
            return out

        intervals = bootstrap_intervals(metrics, resample, len(gen.counts), CI_LEVEL)
        summary["bootstrap"] = {"resamples": len(gen.counts), "seed": cfg.seed, "level": CI_LEVEL,
                                "resampled": "generated images, with replacement"}

    per_image = []
    for s, acc in (("generated", gen), ("reference", ref)):
        for i, row in enumerate(acc.ordered_rows()):
            per_image.append({**row, **{k: _scalar(v[i]) for k, v in columns[s].items()}})
    return _Aggregated(metrics, intervals, summary, per_image, warnings)


def _scalar(v):
    return v.item() if hasattr(v, "item") else v


def _input_warnings(accs: dict[str, _SetAccumulator], size: tuple[int, int]) -> list[str]:
    """Sizes and bit depths that differ from what the sets are compared at."""
    warnings = []
    for s in SETS:
        off = Counter(f"{r['height']}x{r['width']}" for r in accs[s].rows if r["resized"])
        if off:
            sizes = ", ".join(f"{k}: {v}" for k, v in off.most_common(3)) + (", ..." if len(off) > 3 else "")
            warnings.append(
                f"{s}: {sum(off.values())} images were not {size[0]}x{size[1]} and were resized to it ({sizes}); "
                "texture and speckle statistics depend on scale"
            )
    # 8-bit images have 256 grey levels: their histograms comb at the fine (4096-bin) scale that
    # stats/wasserstein and stats/ks read, a difference no generator can close.
    depth = {s: sorted({r["depth"] for r in accs[s].rows}) for s in SETS}
    eight = {s: depth[s] == [8] for s in SETS}
    if eight["generated"] != eight["reference"]:
        g, r = (", ".join("float" if d == 32 else f"{d}-bit" for d in depth[s]) for s in SETS)  # 12: a TIFF's BitsPerSample
        warnings.append(
            f"generated images are {g} but the reference {r}: the sets differ in quantisation "
            "(256 grey levels against more), which the amplitude distances (stats/ks, stats/wasserstein) also "
            "measure; compare sets stored at the same bit depth"
        )
    return warnings


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
        # [lo, hi]: 95% bootstrap interval over the generated images (summary.bootstrap says how).
        "intervals": {k: [_json_float(lo), _json_float(hi)] for k, (lo, hi) in result.intervals.items()},
        "direction": {k: metric_direction(k) for k in result.metrics},
        "generated": str(Path(generated).expanduser().absolute()),
        "reference": str(Path(reference).expanduser().absolute()),
        "normalization": result.normalization,
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
    from sar_ray.data.normalize import DepthError

    bad = [str(e) for e in batch.get("error", ()) if e]
    if bad:
        kind, _, msg = bad[0].partition(": ")
        more = f" (and {len(bad) - 1} more images in the same batch)" if len(bad) > 1 else ""
        raise {"DataError": DataError, "DepthError": DepthError}.get(kind, ImageReadError)(msg + more)


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
