"""Smoke twin of a study: the same file, run on 2 CPU cores with no GPU and no network.

``smoke_study(study, workdir)`` replaces only what cannot exist on such a machine: the model
(a tiny one of the same family), the data (synthetic SAR), the output and storage folders,
the Ray address (a local Ray), the tracking store (a local SQLite file), the SAR-CLIP (a tiny
random one) and the GPUs (at most 2 CPU workers). It rescales every step-valued key by one
factor and keeps at most 6 search points, chosen so that every value of every axis is tried.
Precision, strategies, search algorithm, scheduler and evaluation stay as written: that is
what a smoke run checks before anyone rents GPUs (and what CI checks for every shipped file).

    smoked, replaced = smoke_study(config.load("sweeps/paper.yaml"), Path("runs/smoke"))
    # replaced: ["model.pretrained: stabilityai/stable-diffusion-xl-base-1.0 -> tiny-sdxl", ...]
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from . import config as config_mod
from . import natural
from .config import ConfigError, DataConfig, ModelConfig, ParamSpec, SearchConfig, StudyConfig, TrialConfig

STEPS = 8  # optimizer steps of a smoke trial: enough for a warm-up, evaluations, checkpoints
MAX_POINTS = 6  # search points a smoke sweep runs
SCENES, SIDE = 32, 32  # synthetic SAR scenes and their side (also the training resolution)
VAL_PER_WORKER = 4  # expected held-out scenes per training worker
MAX_BATCH, MAX_EVAL_BATCHES, MAX_EVAL_IMAGES = 2, 2, 16
PROMPTS, SEEDS, SAMPLE_STEPS = 2, 1, 2
MAX_WORKERS = 2
# CPUs one smoke trial holds: two trials at once on 2 cores, one CPU left for Ray Data (see
# sweep.concurrent_trials). A trial with N >= 1 workers also holds its driver's 0.1 CPU
# (sweep.trial_resources); with N = 0 the trial itself is the worker.
TRIAL_CPUS, DRIVER_CPUS = 0.5, 0.1
# Keys counted in optimizer steps: all scaled by one factor, STEPS / train.max_steps.
STEP_KEYS = ("train.max_steps", "train.warmup_steps", "train.eval_every", "train.checkpoint_every",
             "train.sample_every", "train.log_every")
TINY = {"sd15": "tiny-sd15", "sd2": "tiny-sd2", "sdxl": "tiny-sdxl"}
CLIP_DIR = "sarclip-tiny"


def smoke_study(study: StudyConfig, workdir: Path) -> tuple[StudyConfig, list[str]]:
    """The smoke twin of `study`, writing only under `workdir`, and one line per replaced key
    ("model.pretrained: stabilityai/stable-diffusion-xl-base-1.0 -> tiny-sdxl")."""
    workdir = Path(workdir).resolve()
    edit = _Edit(study.model_dump(mode="json"))
    _model(edit, study.model)
    _data(edit, study.data, study.scaling.num_workers)
    _places(edit, study, workdir)
    _resources(edit, study)
    _steps(edit, study)
    _sample_and_eval(edit, study, workdir)
    smoked = edit.validated()
    if smoked.search is not None:
        _points(edit, smoked.search, smoked.trial())
        smoked = edit.validated()
    return smoked, edit.lines


def clear_earlier_run(smoked: StudyConfig) -> bool:
    """Remove the folder of an earlier smoke run of this study (smoke folders are scratch:
    a smoke sweep starts over each time). True when there was one."""
    folder = Path(smoked.out)
    if folder.is_dir():
        shutil.rmtree(folder)
        return True
    return False


# --------------------------------------------------------------------------------------------
# what is replaced
# --------------------------------------------------------------------------------------------


class _Edit:
    """The study as a raw dict, edited key by key; each change is remembered as one line."""

    def __init__(self, raw: dict):
        self.raw, self.lines = raw, []

    def get(self, key: str) -> Any:
        node: Any = self.raw
        for part in key.split("."):
            node = node[part]
        return node

    def put(self, key: str, value: Any, say: str | None = None) -> None:
        old = self.get(key)
        if old == value:
            return
        config_mod._set_path(self.raw, key.split("."), value)
        self.lines.append(f"{key}: {say or f'{_show(old)} -> {_show(value)}'}")

    def validated(self) -> StudyConfig:
        try:
            return StudyConfig.model_validate(self.raw)
        except ValidationError as e:  # a smoke size that the study's own settings refuse
            raise ConfigError(config_mod.format_validation_error(e, "smoke twin", StudyConfig)) from None


def _show(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, str):
        return v
    if isinstance(v, float):
        return f"{v:g}"
    return json.dumps(v)


def model_family(pretrained: str) -> str:
    """sd15 | sd2 | sdxl of a hub id, a local diffusers folder or a tiny model name."""
    if pretrained.startswith("tiny-"):  # tiny-sd, tiny-sdxl, tiny-sdxl-natural, ...
        pretrained = natural.base_of(pretrained) if natural.is_natural(pretrained) else pretrained
        return {"tiny-sd": "sd15"}.get(pretrained) or pretrained.removeprefix("tiny-")
    folder = Path(pretrained)
    if (folder / "model_index.json").is_file():
        if "text_encoder_2" in json.loads((folder / "model_index.json").read_text()):
            return "sdxl"
        unet = folder / "unet" / "config.json"
        # SD 2.x conditions on OpenCLIP-H (1024 wide); SD 1.x on CLIP-L (768).
        if unet.is_file() and json.loads(unet.read_text()).get("cross_attention_dim") == 1024:
            return "sd2"
        return "sd15"
    name = pretrained.lower()
    if "xl" in name:
        return "sdxl"
    return "sd2" if "stable-diffusion-2" in name else "sd15"


def _model(edit: _Edit, model: ModelConfig) -> None:
    # A natural-image tiny base becomes its random twin: its two minutes of pretraining would
    # check nothing the random one does not (tests/test_natural.py builds one with a short recipe).
    tiny = TINY[model_family(model.pretrained)] if natural.is_natural(model.pretrained) or not \
        model.pretrained.startswith("tiny-") else model.pretrained
    edit.put("model.pretrained", tiny)
    edit.put("model.revision", None)  # hub-only settings; the tiny model is built in code
    edit.put("model.variant", None)


def _data(edit: _Edit, data: DataConfig, num_workers: int) -> None:
    default = DataConfig.model_fields
    edit.put("data.path", "synthetic")
    for key in ("captions", "image_column", "text_column", "max_images"):
        edit.put(f"data.{key}", default[key].default)  # the synthetic scenes' own layout
    n = min(data.synthetic.n, SCENES) if data.path == "synthetic" else SCENES
    edit.put("data.synthetic.n", n)
    edit.put("data.synthetic.size", SIDE)
    edit.put("data.resolution", SIDE)
    if data.val_fraction > 0:
        # A few held-out scenes per worker (a study's 1% of 32 scenes is none, and a worker
        # whose validation shard is empty reports no val_loss for ASHA to compare).
        least = VAL_PER_WORKER * max(min(num_workers, MAX_WORKERS), 1) / n
        edit.put("data.val_fraction", max(data.val_fraction, min(least, 0.5)))


def _places(edit: _Edit, study: StudyConfig, workdir: Path) -> None:
    # Under workdir, named after the study: never the real study's folders.
    edit.put("out", str(workdir / study.name))
    edit.put("scaling.storage_path", None)  # Ray Train checkpoints under out
    # "local" rather than null: a null address would let RAY_ADDRESS pick a running cluster.
    edit.put("scaling.address", "local")
    edit.put("tracking.uri", f"sqlite:///{workdir / 'mlflow.db'}")
    if study.search is not None:
        edit.put("search.reference", None, "{} -> the synthetic training scenes".format(_show(study.search.reference)))


def _resources(edit: _Edit, study: StudyConfig) -> None:
    s = study.scaling
    workers = min(s.num_workers, MAX_WORKERS)
    edit.put("scaling.use_gpu", False)
    edit.put("scaling.num_workers", workers)
    cpus = (TRIAL_CPUS - (DRIVER_CPUS if workers else 0)) / max(workers, 1)
    edit.put("scaling.cpus_per_worker", min(s.cpus_per_worker, cpus))
    if study.search is not None:
        # A cluster's trial count; here sweep.concurrent_trials fits it to the local CPUs.
        edit.put("search.max_concurrent_trials", None)


def rescale(value: int, steps: int, max_steps: int) -> int:
    """A step count scaled by steps / max_steps: rounded up, at least 1; 0 (off) stays 0."""
    return 0 if value == 0 else max(1, -(-value * steps // max_steps))


def _steps(edit: _Edit, study: StudyConfig) -> None:
    m = study.train.max_steps
    s = min(m, STEPS)
    for key in STEP_KEYS:
        edit.put(key, rescale(edit.get(key), s, m))
    edit.put("train.batch_size", min(study.train.batch_size, MAX_BATCH))
    edit.put("train.eval_batches", min(study.train.eval_batches, MAX_EVAL_BATCHES))
    if study.search is None:
        return
    if study.search.scheduler.type == "asha":
        # ASHA's last rung is one step short of the end (sweep._tune_pieces).
        grace = study.search.scheduler.grace_period
        edit.put("search.scheduler.grace_period", min(rescale(grace, s, m), max(s - 1, 1)))
    for key, spec in study.search.space.items():  # a searched step key is scaled like the others
        if key in STEP_KEYS:
            axis = _rescaled_axis(spec, s, m).model_dump(mode="json", exclude_none=True)
            edit.raw["search"]["space"][key] = axis  # (a dotted key: not a path for edit.put)
            edit.lines.append(f"search.space.{key}: {_show(spec.model_dump(mode='json', exclude_none=True))} -> "
                              f"{_show(axis)}")


def _rescaled_axis(spec: ParamSpec, s: int, m: int) -> ParamSpec:
    if spec.values is not None:
        values = list(dict.fromkeys(rescale(v, s, m) for v in spec.values))
        return ParamSpec(**{("grid" if spec.grid is not None else "choice"): values})
    kind = "loguniform" if spec.loguniform is not None else "uniform"
    low, high = getattr(spec, kind)
    return ParamSpec(**{kind: (low * s / m, high * s / m)})


def _sample_and_eval(edit: _Edit, study: StudyConfig, workdir: Path) -> None:
    sample = study.sample
    if len(sample.prompts) > PROMPTS:
        edit.put("sample.prompts", sample.prompts[:PROMPTS], f"{len(sample.prompts)} prompts -> the first {PROMPTS}")
    edit.put("sample.seeds", sample.seeds[:SEEDS])
    edit.put("sample.steps", min(sample.steps, SAMPLE_STEPS))
    edit.put("sample.resolution", None)  # data.resolution
    ev = study.eval
    edit.put("eval.max_images", min(ev.max_images or MAX_EVAL_IMAGES, MAX_EVAL_IMAGES))
    edit.put("eval.size", None)  # the smoke images' own size
    if "clip" in ev.metrics:
        edit.put("eval.clip", str(tiny_clip(workdir)), f"{_show(ev.clip)} -> {workdir / CLIP_DIR} (tiny, random init)")


def tiny_clip(workdir: Path) -> Path:
    """A random-init tiny SAR-CLIP in `workdir` (written once): scores run, values mean nothing."""
    out = Path(workdir) / CLIP_DIR
    from .metrics.clip import CONFIG_NAME, WEIGHTS_NAME, build_clip, save_clip

    if not ((out / CONFIG_NAME).is_file() and (out / WEIGHTS_NAME).is_file()):
        save_clip(build_clip("tiny", seed=0), out, "tiny", {"smoke": True})
    return out


# --------------------------------------------------------------------------------------------
# search points
# --------------------------------------------------------------------------------------------


def _points(edit: _Edit, search: SearchConfig, base: TrialConfig) -> None:
    points, missed, inactive = covering_points(search, base)
    if search.algorithm == "grid":
        from .sweep import grid_points

        say = f"{len(points)} of the {len(grid_points(search, base))} grid points"
        edit.put("search.num_samples", 1)  # grid: repeats of the grid
    else:
        say = f"{len(points)} fixed points (every choice, each range's low and high), no sampled ones"
        edit.put("search.num_samples", len(points))
    say += f"; over the {MAX_POINTS}-point limit, not tried: {', '.join(missed)}" if missed else \
        ": every value of every axis is tried"
    if inactive:
        say += f"; never active (a LoRA-only key of a non-LoRA component, or no valid point): {', '.join(inactive)}"
    edit.put("search.points", points, say)


def covering_points(search: SearchConfig, base: TrialConfig, limit: int = MAX_POINTS
                    ) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """At most `limit` search points that try every value of every axis (a range: its low and
    high) at least once; and the `key=value`s left out: those over the limit, and those that
    no valid point of the space has.

    Greedy set cover over the space's points (for a grid its grid points; for optuna/random
    the grid of each axis's values, ranges reduced to [low, high]): take the point that adds
    the most untried (axis, value) pairs, ties to the earlier point. A LoRA-only key (rank)
    appears only in points where its component is LoRA, as in the real search."""
    pool = _pool(search, base)
    wanted = {(k, _tag(v)): f"{k}={_show(v)}" for k, spec in search.space.items() for v in _candidates(spec)}
    chosen: list[dict[str, Any]] = []
    tried: set[tuple[str, str]] = set()
    while len(chosen) < limit and pool:
        best = max(pool, key=lambda p: len(_pairs(p) - tried))
        if not _pairs(best) - tried:
            break
        chosen.append(best)
        tried |= _pairs(best)
    possible = set().union(*map(_pairs, pool))
    missed = [label for pair, label in wanted.items() if pair in possible and pair not in tried]
    inactive = [label for pair, label in wanted.items() if pair not in possible]
    return chosen or pool[:1], missed, inactive


MAX_POOL = 20_000  # beyond this many combinations, list diagonals instead of all of them


def _pool(search: SearchConfig, base: TrialConfig) -> list[dict[str, Any]]:
    from .sweep import diagonal_points, grid_points

    discrete = search.model_copy(update={"space": {k: ParamSpec(grid=_candidates(s)) for k, s in search.space.items()},
                                         "algorithm": "grid", "points": None})
    if math.prod(len(_candidates(s)) for s in search.space.values()) <= MAX_POOL:
        return grid_points(discrete, base)
    return diagonal_points(discrete, base)  # too many to list


def _candidates(spec: ParamSpec) -> list[Any]:
    rng = spec.loguniform or spec.uniform
    return list(spec.values) if spec.values is not None else [rng[0], rng[1]]


def _tag(v: Any) -> str:
    return json.dumps(v, sort_keys=True)  # hashable, also for whole-component dict values


def _pairs(point: dict[str, Any]) -> set[tuple[str, str]]:
    return {(k, _tag(v)) for k, v in point.items()}
