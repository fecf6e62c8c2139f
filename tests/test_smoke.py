"""Smoke twins: every shipped study, made to run on 2 CPUs with nothing but this machine."""

import json
import math
from pathlib import Path

import optuna
import pytest

from sar_ray import config
from sar_ray import smoke as smoke_mod
from sar_ray.config import ConfigError, StudyConfig
from sar_ray.smoke import MAX_POINTS, STEP_KEYS, STEPS, covering_points, model_family, smoke_study
from sar_ray.sweep import _define_by_run, _tune_pieces, concurrent_trials, grid_points

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _values(spec) -> list:
    rng = spec.loguniform or spec.uniform
    return list(spec.values) if spec.values is not None else list(rng)


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_shipped_study_has_a_local_smoke_twin(path, tmp_path):
    study = config.load(path)
    smoked, replaced = smoke_study(study, tmp_path)
    smoked = StudyConfig.model_validate(smoked.model_dump())  # a valid study, not just a copy

    # Everything it touches is on this machine.
    assert smoked.model.pretrained in ("tiny-sd15", "tiny-sd", "tiny-sd2", "tiny-sdxl")
    assert smoked.model.revision is None and smoked.model.variant is None
    assert smoked.data.path == "synthetic"
    assert Path(smoked.out).is_relative_to(tmp_path) and Path(smoked.out).name == study.name
    assert smoked.scaling.storage_path is None and smoked.scaling.address == "local"
    assert smoked.tracking.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert not smoked.scaling.use_gpu and smoked.scaling.num_workers == min(study.scaling.num_workers, 2)
    if "clip" in smoked.eval.metrics:
        assert Path(smoked.eval.clip).is_relative_to(tmp_path) and (Path(smoked.eval.clip) / "open_clip_config.json").is_file()
    # Trials fit 2 CPUs with one left for Ray Data.
    base, s = smoked.trial(), smoked.scaling
    assert 2 - s.num_workers * s.cpus_per_worker >= 1
    assert concurrent_trials(base, smoked.search, {"CPU": 2}) >= 1

    # Precision, strategies and the search itself as written.
    for key in ("model.weight_dtype", "model.vae_force_upcast", "model.prediction_type", "train.mixed_precision",
                "train.gradient_checkpointing", "train.optimizer", "train.lr", "train.grad_accum", "strategy",
                "data.normalization", "data.caption_prefix", "data.materialize", "eval.metrics",
                "search.algorithm", "search.seed", "search.space", "search.objectives", "search.scheduler.type",
                "search.scheduler.metric", "search.scheduler.mode", "search.evaluate"):
        assert _get(smoked, key) == _get(study, key), key

    # One factor for every step key.
    m, n = study.train.max_steps, smoked.train.max_steps
    assert n == min(m, STEPS)
    for key in STEP_KEYS:
        old, new = _get(study, key), _get(smoked, key)
        assert new == (0 if old == 0 else max(1, math.ceil(old * n / m))), key
    if study.search.scheduler.type == "asha":
        g = study.search.scheduler.grace_period
        assert smoked.search.scheduler.grace_period == min(max(1, math.ceil(g * n / m)), n - 1)

    # At most 6 points, trying every value of every axis.
    points = smoked.search.points
    assert 1 <= len(points) <= MAX_POINTS
    for key, spec in smoked.search.space.items():
        for v in _values(spec):
            assert any(p.get(key) == v for p in points), f"{key}={v} is never tried"
    if smoked.search.algorithm == "grid":
        grid = grid_points(smoked.search, base)
        assert all(p in grid for p in points) and smoked.search.num_samples == 1
    else:
        assert smoked.search.num_samples == len(points)

    # It says what it replaced, one `key: ...` line each.
    keys = {line.split(":", 1)[0] for line in replaced}
    assert {"out", "tracking.uri", "train.max_steps", "search.points"} <= keys
    if study.model.pretrained != smoked.model.pretrained:
        assert f"model.pretrained: {study.model.pretrained} -> {smoked.model.pretrained}" in replaced


def test_smoke_twin_of_the_paper_study_names_what_it_replaced(tmp_path):
    smoked, replaced = smoke_study(config.load(ROOT / "sweeps/paper.yaml"), tmp_path)
    assert "model.pretrained: stabilityai/stable-diffusion-xl-base-1.0 -> tiny-sdxl" in replaced
    assert "scaling.address: auto -> local" in replaced
    assert "train.max_steps: 3000 -> 8" in replaced and "train.eval_every: 250 -> 1" in replaced
    assert "search.scheduler.grace_period: 750 -> 2" in replaced
    assert any(line.startswith("search.points: 3 of the 53 grid points") for line in replaced)
    assert smoked.model.weight_dtype == "bf16" and smoked.train.mixed_precision == "bf16"


@pytest.mark.parametrize("pretrained, family", [
    ("stabilityai/stable-diffusion-xl-base-1.0", "sdxl"),
    ("stabilityai/sdxl-turbo", "sdxl"),
    ("stabilityai/stable-diffusion-2-1", "sd2"),
    ("runwayml/stable-diffusion-v1-5", "sd15"),
    ("tiny-sd", "sd15"),
    ("tiny-sd2", "sd2"),
    ("tiny-sdxl", "sdxl"),
])
def test_model_family_of_hub_ids_and_tiny_names(pretrained, family):
    assert model_family(pretrained) == family


def test_model_family_of_local_folders(tmp_path):
    def folder(name: str, index: dict, cross: int) -> str:
        p = tmp_path / name
        (p / "unet").mkdir(parents=True)
        (p / "model_index.json").write_text(json.dumps(index))
        (p / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": cross}))
        return str(p)

    sd = {"unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"]}
    assert model_family(folder("xl", {**sd, "text_encoder_2": ["transformers", "X"]}, 2048)) == "sdxl"
    assert model_family(folder("two", sd, 1024)) == "sd2"
    assert model_family(folder("one", sd, 768)) == "sd15"
    study = config.load(None, [f"model.pretrained={tmp_path / 'two'}"])
    assert smoke_study(study, tmp_path / "w")[0].model.pretrained == "tiny-sd2"


def _study(tmp_path, space: dict, algorithm: str, *sets: str):
    return config.load(None, [f"search={json.dumps({'algorithm': algorithm, 'space': space})}", *sets])


def test_lora_only_values_are_tried_where_the_component_is_lora(tmp_path):
    s = _study(tmp_path, {"strategy.unet.mode": {"grid": ["full", "lora"]}, "strategy.unet.rank": {"grid": [4, 8, 16]},
                          "strategy.token": {"grid": ["none", "learn"]}}, "grid")
    points, missed, inactive = covering_points(s.search, s.trial())
    assert not missed and not inactive
    assert sorted(p["strategy.unet.rank"] for p in points if "strategy.unet.rank" in p) == [4, 8, 16]
    assert all(("strategy.unet.rank" in p) == (p["strategy.unet.mode"] == "lora") for p in points)
    assert {p["strategy.unet.mode"] for p in points} == {"full", "lora"} and len(points) == 4


def test_ranges_take_their_low_and_high_and_optuna_runs_the_points_first(tmp_path):
    s = _study(tmp_path, {"strategy.unet.rank": {"choice": [4, 8, 16]}, "train.lr": {"loguniform": [1e-5, 1e-3]}},
               "optuna", "search.num_samples=20")
    smoked, _ = smoke_study(s, tmp_path)
    points = smoked.search.points
    assert {p["train.lr"] for p in points} == {1e-5, 1e-3} and smoked.search.num_samples == len(points) == 3
    # The points are the Optuna study's first trials, through the same define-by-run space.
    define = _define_by_run(smoked.search, smoked.trial())
    st = optuna.create_study()
    for p in points:
        st.enqueue_trial(p)
    for p in points:
        t = st.ask()
        define(t)
        assert t.params == p
    _, alg, _, num_samples = _tune_pieces(smoked, smoked.trial())
    assert alg._points_to_evaluate == points and num_samples == 3


def test_more_values_than_points_takes_six_and_says_what_it_leaves_out(tmp_path):
    s = _study(tmp_path, {"strategy.unet.rank": {"choice": [1, 2, 3, 4, 5, 6, 7, 8]}}, "random", "search.num_samples=8")
    smoked, replaced = smoke_study(s, tmp_path)
    assert [p["strategy.unet.rank"] for p in smoked.search.points] == [1, 2, 3, 4, 5, 6]
    line = next(x for x in replaced if x.startswith("search.points:"))
    assert "not tried: strategy.unet.rank=7, strategy.unet.rank=8" in line


def test_a_space_too_large_to_list_still_tries_every_value(tmp_path):
    """Over MAX_POOL combinations the pool is the space's diagonals (sweep.diagonal_points):
    every value of every axis still appears, a rank only where its component is LoRA."""
    ranks, lrs = [1, 2, 4, 8, 16, 32, 64], [1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3]
    space = {"strategy.unet.mode": {"grid": ["full", "lora"]}, "strategy.unet.rank": {"grid": ranks},
             "train.lr": {"grid": lrs}, "train.seed": {"grid": list(range(7))},
             "train.warmup_steps": {"grid": list(range(7))}, "train.max_grad_norm": {"grid": [0.5, 1.0, 2.0]},
             "strategy.token": {"grid": ["none", "learn"]}}
    s = _study(tmp_path, space, "grid")
    assert math.prod(len(v["grid"]) for v in space.values()) > smoke_mod.MAX_POOL
    points, missed, inactive = covering_points(s.search, s.trial(), limit=100)
    assert not missed and not inactive
    for key, spec in space.items():
        assert {json.dumps(p[key]) for p in points if key in p} == {json.dumps(v) for v in spec["grid"]}, key
    assert all(("strategy.unet.rank" in p) == (p["strategy.unet.mode"] == "lora") for p in points)


def test_a_searched_step_key_is_rescaled_like_the_others(tmp_path):
    s = _study(tmp_path, {"train.warmup_steps": {"grid": [0, 10, 50]}}, "grid", "train.max_steps=100")
    smoked, _ = smoke_study(s, tmp_path)
    assert smoked.search.space["train.warmup_steps"].grid == [0, 1, 4]
    assert sorted(p["train.warmup_steps"] for p in smoked.search.points) == [0, 1, 4]


def test_search_points_are_checked(tmp_path):
    space = {"strategy.unet.mode": {"grid": ["full", "lora"]}, "strategy.unet.rank": {"grid": [4, 8]}}
    with pytest.raises(ConfigError, match=r"points\[0\]: 'strategy.unet.rnak' is not a search.space key"):
        _study(tmp_path, space, "grid", 'search.points=[{"strategy.unet.rnak": 4}]')
    with pytest.raises(ConfigError, match=r"points\[0\]: strategy.unet.rank = 5 is not one of \[4, 8\]"):
        _study(tmp_path, space, "grid", 'search.points=[{"strategy.unet.rank": 5}]')
    with pytest.raises(ConfigError, match="num_samples"):
        _study(tmp_path, {"train.lr": {"loguniform": [1e-5, 1e-3]}}, "optuna",
               'search.points=[{"train.lr": 1e-4}, {"train.lr": 1e-5}]')
    # A rank where the UNet is not LoRA is no grid point.
    bad = _study(tmp_path, space, "grid", 'search.points=[{"strategy.unet.mode": "full", "strategy.unet.rank": 4}]')
    with pytest.raises(ConfigError, match=r"search.points\[0\].*is not a point of the grid"):
        _tune_pieces(bad, bad.trial())
    good = _study(tmp_path, space, "grid", 'search.points=[{"strategy.unet.mode": "full"}]')
    param_space, *_ = _tune_pieces(good, good.trial())
    assert param_space["params"] == {"grid_search": [{"strategy.unet.mode": "full"}]}


def test_cli_smoke_ignores_ray_address(tmp_path, monkeypatch):
    import argparse

    from sar_ray import cli

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    study = config.load(ROOT / "sweeps/paper.yaml", ["scaling.address=10.0.0.2:6379"])
    smoked = cli._smoke(study, argparse.Namespace(smoke_dir=str(tmp_path)))
    assert smoked.scaling.address == "local"
    import os

    assert "RAY_ADDRESS" not in os.environ


@pytest.mark.slow
def test_smoke_trial_of_the_quickstart_runs_locally(tmp_path, monkeypatch):
    from sar_ray import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # nothing listens there: smoke must not try it
    assert cli.main(["trial", str(ROOT / "sweeps/quickstart.yaml"), "--smoke", "-q", "--smoke-dir", "smk"]) == 0
    out = tmp_path / "smk" / "quickstart"
    trial_dir = next(out.glob("unet-*"))
    assert (trial_dir / "weights").is_dir() and (trial_dir / "samples" / "final" / "grid.png").is_file()
    log = [json.loads(x) for x in (trial_dir / "train_log.jsonl").read_text().splitlines()]
    assert max(r.get("step", 0) for r in log) == STEPS
    assert (tmp_path / "smk" / "mlflow.db").is_file()
