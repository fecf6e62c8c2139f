"""The sar-ray command: exit codes and one-line errors for bad input; nothing lost."""

import json
import os
import shutil
from pathlib import Path

import pytest

from sar_ray.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_the_public_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("trial", "validate", "data", "evaluate", "clip"):
        assert cmd in out


def test_validate_ok_and_print(capsys):
    code, out, _ = run(capsys, "validate", str(ROOT / "sweeps/quickstart.yaml"), "--print")
    assert code == 0
    assert "ok" in out and "unet-full_te-lora4_vae-frozen_tok" in out
    assert "pretrained: tiny-sdxl" in out


def test_validate_unknown_key_exit_2_one_line(capsys, tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("strategy:\n  unet:\n    rnak: 4\n")
    code, _, err = run(capsys, "validate", str(p))
    assert code == 2
    assert "strategy.unet.rnak: unknown key" in err
    assert len(err.strip().splitlines()) == 1


def test_validate_wrong_type_via_set(capsys):
    code, _, err = run(capsys, "validate", str(ROOT / "sweeps/quickstart.yaml"), "--set", "train.batch_size=many")
    assert code == 2 and "train.batch_size" in err


def test_data_synth_writes_imagefolder(capsys, tmp_path):
    code, out, _ = run(capsys, "data", "synth", "--out", str(tmp_path / "s"), "--n", "6", "--size", "32")
    assert code == 0
    rows = [json.loads(x) for x in (tmp_path / "s" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all((tmp_path / "s" / r["file_name"]).is_file() for r in rows)
    code, _, err = run(capsys, "data", "synth", "--out", str(tmp_path / "t"), "--n", "0")
    assert code == 2 and "--n > 0" in err


def _trial_args(tmp_path, *sets):
    args = ["trial", str(ROOT / "sweeps/quickstart.yaml"), "-q", "--out", str(tmp_path / "out"),
            "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
            "--set", "train.max_steps=2", "--set", "train.batch_size=2", "--set", "data.resolution=32",
            "--set", "sample.steps=1", "--set", "sample.seeds=[0]", "--set", "model.pretrained=tiny-sd"]
    for s in sets:
        args += ["--set", s]
    return args


@pytest.mark.parametrize("sets, fragment", [
    (["data.path={tmp}/missing"], "missing"),
    (["data.path={tmp}/empty"], "empty"),
])
def test_trial_bad_data_paths_exit_2(capsys, tmp_path, monkeypatch, ray_local, sets, fragment):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, *_trial_args(tmp_path, *[s.format(tmp=tmp_path) for s in sets]))
    assert code == 2, err
    assert fragment in err.lower() and str(tmp_path) in err
    assert not (tmp_path / "out" / "weights").exists()


def _write_folder(root: Path, n: int = 8, corrupt: bool = False, missing: bool = False) -> Path:
    from sar_ray.data import write_synthetic

    write_synthetic(root, n=n, size=32, seed=0)
    rows = [json.loads(x) for x in (root / "metadata.jsonl").read_text().splitlines()]
    if corrupt:
        (root / rows[0]["file_name"]).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    if missing:
        rows.append({"file_name": "nowhere/ghost.png", "text": "<SAR> a ghost"})
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / rows[0]["file_name"]


def test_corrupt_image_refused_with_its_path_or_skipped_and_counted(capsys, tmp_path, monkeypatch, ray_local):
    monkeypatch.chdir(tmp_path)
    bad = _write_folder(tmp_path / "d", n=12, corrupt=True)
    code, _, err = run(capsys, *_trial_args(tmp_path, f"data.path={tmp_path / 'd'}", "data.on_corrupt=error",
                                            "tracking.enabled=false"))
    assert code == 2 and bad.name in err
    code, out, err = run(capsys, *_trial_args(tmp_path, f"data.path={tmp_path / 'd'}", "data.on_corrupt=skip",
                                              "tracking.enabled=false"))
    assert code == 0, err
    assert "1 corrupt skipped" in out


def test_caption_rows_naming_missing_images_exit_2(capsys, tmp_path, monkeypatch, ray_local):
    monkeypatch.chdir(tmp_path)
    _write_folder(tmp_path / "d", missing=True)
    code, _, err = run(capsys, *_trial_args(tmp_path, f"data.path={tmp_path / 'd'}", "tracking.enabled=false"))
    assert code == 2 and "ghost.png" in err


def test_unreachable_mlflow_server_exit_2_before_training(capsys, tmp_path, monkeypatch, ray_local):
    monkeypatch.chdir(tmp_path)
    args = _trial_args(tmp_path)
    args[args.index("--tracking-uri") + 1] = "http://127.0.0.1:9"  # discard port: nothing listens
    code, _, err = run(capsys, *args)
    assert code == 2 and "http://127.0.0.1:9" in err and "unreachable" in err
    assert not (tmp_path / "out" / "train_log.jsonl").exists()


def test_unreachable_ray_address_exit_2(tmp_path):
    # A fresh process: this test process already runs a local Ray.
    import subprocess
    import sys

    args = _trial_args(tmp_path, "scaling.address=127.0.0.1:9", "tracking.enabled=false")
    p = subprocess.run([sys.executable, "-m", "sar_ray.cli", *args], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert "cannot connect to Ray at '127.0.0.1:9'" in p.stderr


def test_a_stale_ray_start_record_starts_a_local_ray_instead_of_retrying_it(tmp_path, monkeypatch):
    # `ray start` records its cluster in <RAY_TMPDIR>/ray/ray_current_cluster, and ray.init()
    # without an address joins it. A cluster killed without `ray stop` leaves the record behind:
    # before, `sar-ray trial` (and the README's main job) then retried that address for minutes.
    import subprocess
    import sys
    import tempfile

    from sar_ray.train import ray_address

    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9\n")  # discard port: nothing listens
    args = _trial_args(tmp_path, "tracking.enabled=false")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(ray_tmp)}
    try:
        p = subprocess.run([sys.executable, "-m", "sar_ray.cli", *args], capture_output=True, text=True,
                           timeout=300, cwd=tmp_path, env=env)
        assert p.returncode == 0, p.stderr
        assert "ray_current_cluster: the Ray cluster it records (127.0.0.1:9) does not answer" in p.stderr
        assert (tmp_path / "out" / "metrics.json").is_file() or (tmp_path / "out" / "weights").exists()

        # A record of a cluster that answers is Ray's to join, as `ray.init()` does.
        import socket

        with socket.socket() as live:
            live.bind(("127.0.0.1", 0))
            live.listen()
            (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{live.getsockname()[1]}\n")
            monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
            monkeypatch.delenv("RAY_ADDRESS", raising=False)
            assert ray_address(None) is None
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_nan_loss_stops_with_the_step_and_keeps_checkpoints(capsys, tmp_path, monkeypatch, ray_local):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *_trial_args(tmp_path, "train.lr=1e30", "train.max_grad_norm=null",
                                            "train.max_steps=8", "train.checkpoint_every=1",
                                            "strategy.unet.mode=full", "train.warmup_steps=0"))
    assert code == 1, err
    assert "loss is nan at step" in err.lower() or "loss is inf at step" in err.lower()
    assert any((tmp_path / "out" / "checkpoints").glob("step-*"))

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run_ = client.search_runs([client.get_experiment_by_name("sar-quickstart").experiment_id])[0]
    assert run_.info.status == "FAILED" and "loss is" in run_.data.tags["sar_ray.error"]

    # The same command again resumes into the same divergence: it fails at once, trains nothing.
    log = (tmp_path / "out" / "train_log.jsonl").read_text()
    code, _, err = run(capsys, *_trial_args(tmp_path, "train.lr=1e30", "train.max_grad_norm=null",
                                            "train.max_steps=8", "train.checkpoint_every=1",
                                            "strategy.unet.mode=full", "train.warmup_steps=0"))
    assert code == 1 and "diverged before with this exact config" in err
    assert (tmp_path / "out" / "train_log.jsonl").read_text() == log


def test_trial_over_the_stated_gpu_memory_is_refused_before_any_compute(capsys, tmp_path, monkeypatch):
    """The plan counts the real-size SDXL behind tiny-sdxl: a full UNet's weights, gradients and
    AdamW state alone exceed 4 GB, so the trial is refused (exit 2) and nothing is written."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "trial", str(ROOT / "sweeps/quickstart.yaml"), "--no-tracking", "-q",
                       "--set", "scaling.gpu_memory_gb=4", "--out", str(tmp_path / "t"))
    assert code == 2 and "gpu_memory_gb" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "t").exists()


def test_evaluate_reads_a_webdataset_reference_with_the_studys_members(capsys, tmp_path, shards):
    """`evaluate --reference <shards> --config sweeps/sarlo80.yaml`: the study's data.image_column
    picks the member the reference is read from; a member the shards lack exits 2, one line."""
    import numpy as np
    from PIL import Image

    shards.write_sarlo(tmp_path / "wds", n_shards=2, per_shard=4)
    gen = tmp_path / "gen"
    gen.mkdir()
    for i in range(6):
        amp = np.abs(shards.slc(f"{i:04d}"))
        Image.fromarray(np.round(amp / amp.max() * 65535).astype(np.uint16)).save(gen / f"{i}.png")
    pattern = str(tmp_path / "wds" / "shard-{000000..000001}.tar")
    study = str(ROOT / "sweeps" / "sarlo80.yaml")
    for member in ("sar.npy", "sar.png"):
        out = tmp_path / f"{member}.json"
        code, _, err = run(capsys, "evaluate", "--generated", str(gen), "--reference", pattern, "--config", study,
                           "--set", f"data.image_column={member}", "--metrics", "stats", "--out", str(out), "-q")
        assert code == 0, err
        doc = json.loads(out.read_text())
        assert doc["n_reference"] == 8 and doc["n_generated"] == 6
    # The complex SLC is read as |s|, the PNG as the stored amplitude x 1000: after the reference
    # normalisation (a ratio to the set's own statistics) the two readings give the same scores.
    a, b = (json.loads((tmp_path / f"{m}.json").read_text())["metrics"] for m in ("sar.npy", "sar.png"))
    assert a["stats/wasserstein"] == pytest.approx(b["stats/wasserstein"], abs=2e-3)
    code, _, err = run(capsys, "evaluate", "--generated", str(gen), "--reference", pattern, "--config", study,
                       "--set", "data.image_column=sar.tif", "--metrics", "stats", "-q")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "sar.tif" in lines[0], err


def test_report_metric_is_checked_like_an_objective_and_defaults_to_its_own_direction(capsys, tmp_path):
    """`report --metric` ranks like a sweep objective: a typo is one line, exit 2, before MLflow is
    touched; without --mode a higher-is-better metric (clip/score) is ranked by its own direction."""
    from sar_ray.config import objective_direction

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    code, _, err = run(capsys, "report", "--experiment", "x", "--tracking-uri", uri, "--metric", "stats/jss")
    assert code == 2 and "'stats/jss' is not reported by a trial (did you mean 'stats/js'?)" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "mlflow.db").exists()
    code, _, err = run(capsys, "report", "--experiment", "x", "--tracking-uri", uri, "--metric", "stats/js", "--mode", "max")
    assert code == 2 and "set mode: min" in err
    assert (objective_direction("clip/score"), objective_direction("stats/js"), objective_direction("val_loss")) == (
        "max", "min", "min")
