"""Config loading: what users type in YAML and --set, and the errors they get back."""

from pathlib import Path

import pytest

from sar_ray import config
from sar_ray.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_shipped_sweep_file_validates_and_opens_with_its_command(path):
    study = config.load(path)
    trial = study.trial()
    assert trial.train.max_steps > 0
    first = path.read_text().splitlines()[0]
    assert first.startswith("# Run:") and "sar-ray" in first, "each sweep file opens with the command that runs it"


def test_defaults_are_a_complete_trial():
    cfg = config.load(None).trial()
    assert cfg.model.pretrained == "tiny-sdxl"
    assert cfg.data.path == "synthetic"
    assert cfg.tracking.resolved_uri().startswith(("sqlite:///", "http")) or cfg.tracking.uri
    assert cfg.out_dir == Path("runs") / "trial" / cfg.strategy.slug


def test_set_overrides_parse_types_and_nest():
    cfg = config.load(ROOT / "sweeps/quickstart.yaml", [
        "strategy.unet.mode=lora", "strategy.unet.rank=8", "train.lr=3e-5", "data.flip=false", "out=runs/t1",
    ]).trial()
    assert cfg.strategy.unet.mode == "lora" and cfg.strategy.unet.rank == 8
    assert cfg.train.lr == pytest.approx(3e-5)
    assert cfg.data.flip is False
    assert cfg.out_dir == Path("runs/t1")
    assert cfg.strategy.slug.startswith("unet-lora8_")


@pytest.mark.parametrize("sets", [
    ["strategy.unet.mode=lora", "strategy.unet.rank=8", "strategy.token=learn"],
    ["model.pretrained=tiny-sdxl", "strategy.text_encoder.mode=lora", "strategy.text_encoder_2.mode=lora",
     "strategy.text_encoder_2.rank=2", "strategy.vae.mode=full"],
])
def test_the_sweeps_strategy_name_is_the_reports(sets):
    """The sweep's summary named a strategy by its slug (`unet-lora8_...`), report.md by its
    combination (`unet-lora_...`, read back from the logged params): one best, two names."""
    from sar_ray.report import _combination

    cfg = config.load(None, sets).trial()
    assert cfg.strategy.combination == _combination({k: str(v) for k, v in config.flatten(cfg).items()})
    assert cfg.strategy.slug != cfg.strategy.combination  # the slug keeps its ranks (run names, folders)


def test_yaml_scientific_notation_without_dot_is_a_float(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("train:\n  lr: 1e-4\n")
    assert config.load(p).train.lr == pytest.approx(1e-4)


def test_unknown_key_names_file_path_and_suggests(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("strategy:\n  unet:\n    rnak: 4\n")
    with pytest.raises(ConfigError) as e:
        config.load(p)
    msg = str(e.value)
    assert f"{p}: strategy.unet.rnak: unknown key (did you mean 'rank'?)" in msg
    assert "valid keys:" in msg


def test_wrong_type_names_path_and_value(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("train:\n  max_steps: lots\n")
    with pytest.raises(ConfigError, match=r"train\.max_steps: .*integer.*'lots'"):
        config.load(p)


def test_override_errors_mention_the_override():
    with pytest.raises(ConfigError, match=r"--set strategy.unet.rank=-4\).*strategy\.unet\.rank: must be > 0 \(got -4\)"):
        config.load(None, ["strategy.unet.rank=-4"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        config.load(None, ["strategy.unet.rank"])
    with pytest.raises(ConfigError, match="unknown key"):
        config.load(None, ["strategy.unett.mode=lora"])


@pytest.mark.parametrize("overrides, fragment", [
    (["strategy.unet.rank=0"], "must be > 0"),
    (["strategy.unet.mode=frozen"], "nothing would train"),
    (["strategy.unet.mode=sideways"], "strategy.unet.mode"),
    (["strategy.token=maybe"], "strategy.token"),
    (["strategy.token=learn", "strategy.token_string=<RADAR>"], "must be strategy.token_string"),
    (["strategy.token=learn", "data.caption_prefix=null"], "must be strategy.token_string"),
    (["strategy.token=learn", "sample.prompts=[image of a forest]"], "no sample.prompts entry contains '<SAR>'"),
    (["model.weight_dtype=bf16"], "model.weight_dtype=bf16 needs train.mixed_precision=bf16"),
    (["model.weight_dtype=fp16", "train.mixed_precision=no"], "needs train.mixed_precision=fp16"),
    (["data.normalization.db_min=5", "data.normalization.db_max=-5"], "db_min must be < db_max"),
    (["train.batch_size=0"], "train.batch_size"),
    (["data.val_fraction=0.5", "data.holdout_fraction=0.5"], "holdout_fraction must be < 1 so that some images train"),
    (['search={"space": {"train.lr": {"choice": [1e-4]}}, "repeats": 0}'], "search.repeats"),
    (['search={"space": {"train.seed": {"choice": [0, 1]}}, "repeats": 2}'], "remove train.seed from search.space"),
])
def test_invalid_settings_are_refused_at_validation(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        config.load(None, overrides)


def test_every_mode_combination_is_valid():
    modes = ["frozen", "full", "lora"]
    n = 0
    for u in modes:
        for te in modes:
            for v in modes:
                for tok in ["none", "learn"]:
                    sets = [f"strategy.unet.mode={u}", f"strategy.text_encoder.mode={te}",
                            f"strategy.vae.mode={v}", f"strategy.token={tok}"]
                    if u == te == v == "frozen" and tok == "none":
                        with pytest.raises(ConfigError):
                            config.load(None, sets)
                        continue
                    config.load(None, sets)
                    n += 1
    assert n == 53


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(bad)


def test_flatten_lists_every_resolved_parameter():
    flat = config.flatten(config.load(None).trial())
    for key in ["model.pretrained", "data.path", "data.resolution", "strategy.unet.mode", "strategy.unet.rank",
                "strategy.text_encoder.lr", "strategy.vae.mode", "strategy.token", "train.lr", "train.max_steps",
                "train.batch_size", "train.seed", "scaling.num_workers", "scaling.use_gpu", "tracking.uri",
                "tracking.experiment"]:
        assert key in flat


def test_mixed_precision_no_survives_yaml(tmp_path):
    """YAML 1.1 reads a bare `no` as false: both a file and --set must still mean "no"."""
    f = tmp_path / "s.yaml"
    f.write_text("train:\n  mixed_precision: no\n")
    assert config.load(f).train.mixed_precision == "no"
    assert config.load(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_shipped_study_expands_its_search_space(path, capsys):
    """Every trial the file can produce is a valid config (grid: all points; optuna/random: the
    define-by-run space, as Tune's searcher calls it, on an in-memory Optuna study)."""
    import optuna

    from sar_ray.sweep import _define_by_run, grid_points, trial_config

    study = config.load(path)
    base = study.trial()
    assert study.search is not None, "every shipped study is a sweep"
    if study.search.algorithm == "grid":
        points = grid_points(study.search, base)
        assert len(points) > 0
    else:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        define = _define_by_run(study.search, base)
        st = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        points = []
        for _ in range(8):
            t = st.ask()
            define(t)
            points.append(t.params)
        assert all(set(p) <= set(study.search.space) and p for p in points)
    for p in points:
        trial_config(study, p, Path("runs") / study.name / "trials" / "x", study.name)
    assert capsys.readouterr() == ("", "")


def test_validate_counts_seed_replicas_as_trials(capsys):
    from sar_ray.cli import main
    from sar_ray.sweep import check_search

    quick = ROOT / "sweeps/quickstart.yaml"
    assert check_search(config.load(quick))[0] == 8
    assert check_search(config.load(quick, ["search.repeats=3"]))[0] == 24  # 8 points x 3 seeds
    optuna = config.load(None, ['search={"space": {"train.lr": {"loguniform": [1e-5, 1e-3]}}, "num_samples": 5}',
                                "search.repeats=2"])
    assert check_search(optuna)[0] == 10  # num_samples points, each run with 2 seeds
    # A grid's search.points are the points it runs: one fixed point x 2 seeds, not the 8 x 2 it counted.
    one = '[{"strategy.unet": {"mode": "full", "lr": 5.0e-4}, "strategy.text_encoder": {"mode": "frozen"}, "strategy.token": "none"}]'
    assert check_search(config.load(quick, [f"search.points={one}", "search.repeats=2"]))[0] == 2
    assert main(["validate", str(quick), "--set", "search.repeats=3"]) == 0
    assert "24 trials (8 points x 3 seeds)" in capsys.readouterr().out


def test_asha_on_a_quick_realism_metric_needs_samples_at_every_rung():
    """quick/<metric> is computed on the samples taken every train.sample_every steps: a rung
    between two of them would read a stale value (or none), a typo would never be reported."""
    base = ["model.pretrained=tiny-sd", "train.max_steps=40",
            'search={"space": {"train.lr": {"grid": [1.0e-4, 1.0e-3]}}, '
            '"scheduler": {"type": "asha", "metric": "quick/stats/js", "grace_period": 5, "reduction_factor": 2}}']
    study = config.load(None, base + ["train.sample_every=5"])  # rungs 5, 10, 20: multiples of 5
    assert study.search.scheduler.metric == "quick/stats/js"
    with pytest.raises(ConfigError, match="set train.sample_every"):
        config.load(None, base)
    with pytest.raises(ConfigError, match="not all multiples of train.sample_every=10"):
        config.load(None, base + ["train.sample_every=10"])
    with pytest.raises(ConfigError, match="not a quick metric; valid: quick/stats/js"):
        config.load(None, [b.replace("quick/stats/js", "quick/stats/jss") for b in base] + ["train.sample_every=5"])
    # A metric only the finished trial reports (its evaluation) is missing at every rung: ASHA
    # would silently stop nothing.
    with pytest.raises(ConfigError, match="'stats/js' is not reported while a trial trains"):
        config.load(None, [b.replace("quick/stats/js", "stats/js") for b in base] + ["train.sample_every=5"])


def test_one_variable_moves_every_cache_the_eval_one_included(monkeypatch, tmp_path):
    """A cluster user points $SAR_RAY_CACHE at shared disk: the natural bases, the CLIP BPE files
    and the reference descriptors all go there (the eval cache used to stay in ~/.cache)."""
    from sar_ray import models, natural

    monkeypatch.setenv("SAR_RAY_CACHE", str(tmp_path / "shared"))
    assert config.default_eval_cache() == str(tmp_path / "shared" / "eval")
    assert natural.cache_root() == tmp_path / "shared" / "models"
    assert models._cache_dir() == tmp_path / "shared" / "clip-bpe"
    monkeypatch.delenv("SAR_RAY_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert config.default_eval_cache() == str(tmp_path / "xdg" / "sar-ray" / "eval")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert config.default_eval_cache() == "~/.cache/sar-ray/eval"  # expanded on the node that uses it
