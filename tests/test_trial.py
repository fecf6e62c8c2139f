"""A whole trial through Ray Train local mode: outputs, MLflow run, resume, failures."""

import json
import time
from pathlib import Path

import numpy as np
import pytest

from sar_ray import config
from sar_ray.trial import read_log, run_trial

PROMPTS = '["<SAR> image of open water with a ship", "<SAR> image of a forest"]'


def small_cfg(tmp_path: Path, *sets: str, model: str = "tiny-sd", out: str = "out"):
    return config.load(None, [
        f"model.pretrained={model}",
        "data.synthetic.n=24", "data.synthetic.size=32", "data.resolution=32", "data.val_fraction=0.2",
        "train.max_steps=4", "train.batch_size=2", "train.eval_every=2", "train.checkpoint_every=2",
        "train.eval_batches=1",
        f"sample.prompts={PROMPTS}", "sample.seeds=[0, 1]", "sample.steps=2",
        f"out={tmp_path / out}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "tracking.experiment=test",
        *sets,
    ]).trial()


@pytest.fixture
def in_tmp(tmp_path, monkeypatch, ray_local):
    monkeypatch.chdir(tmp_path)  # the synthetic-data cache and relative paths land here
    return tmp_path


def test_trial_writes_loadable_outputs_samples_and_one_mlflow_run(in_tmp):
    cfg = small_cfg(in_tmp, "strategy.unet.mode=lora", "strategy.text_encoder.mode=lora", "strategy.token=learn",
                    "train.sample_every=2", model="tiny-sdxl")
    r = run_trial(cfg, progress=False)
    assert r.step == 4 and np.isfinite(r.loss) and r.val_loss is not None
    assert (r.weights / "pytorch_lora_weights.safetensors").is_file()
    assert (r.weights / "learned_embeds.safetensors").is_file()
    assert (r.weights / "learned_embeds_2.safetensors").is_file()
    meta = [json.loads(x) for x in (r.samples / "metadata.jsonl").read_text().splitlines()]
    assert len(meta) == 4 and {m["seed"] for m in meta} == {0, 1}
    assert all((r.samples / m["file_name"]).is_file() for m in meta)
    assert (r.samples / "grid.png").is_file()
    steps = [rec["step"] for rec in read_log(r.out / "train_log.jsonl") if "loss" in rec]
    assert steps == [1, 2, 3, 4]
    assert r.trainable_params and r.trainable_params > 0

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{in_tmp}/mlflow.db")
    exp = client.get_experiment_by_name("test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == f"trial/{cfg.strategy.slug}"
    assert run.data.params["strategy.unet.mode"] == "lora"
    assert run.data.params["data.n_train"] == str(r.n_train)
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 4
    assert len(client.get_metric_history(run.info.run_id, "val/loss")) == 2
    # The quick realism metric of the step-2 samples (what ASHA may rank on), logged at its step.
    quick = client.get_metric_history(run.info.run_id, "quick/stats/js")
    assert [m.step for m in quick] == [2] and 0 <= quick[0].value <= 1
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"weights", "samples", "config.yaml", "train_log.jsonl"} <= arts
    assert "grid.png" in {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "samples/final")}
    # Sample grids as MLflow images at their step: the intermediate one (step 2) and the final one.
    images = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "images")}
    assert {n.split("+")[2] for n in images if n.startswith("samples+step+") and n.endswith(".png")} == {"2", "4"}


def test_monitor_keeps_the_log_from_the_workers_channel_and_drops_history_after_a_resume(ray_local, tmp_path):
    """The driver's log comes through the channel (no filesystem shared with the workers);
    a run resumed at step 2 replaces what the interrupted run logged after step 2."""
    import ray

    from sar_ray.trial import TrialMonitor

    m = TrialMonitor(tmp_path / "trial")
    sent = []

    def put(*records):
        ray.get(m.channel.put.remote("rank0", len(sent), list(records)))
        sent.append(records)

    put({"event": "start", "step": 0, "trainable_params": 5}, {"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.9},
        {"step": 3, "loss": 0.8})
    m.poll()
    put({"event": "resumed", "step": 2}, {"event": "start", "step": 2, "trainable_params": 5},
        {"step": 3, "loss": 0.7}, {"step": 3, "val_loss": 0.5}, {"event": "end", "step": 3, "peak_memory_mb": 12.0})
    m.stop()
    log = read_log(tmp_path / "trial" / "train_log.jsonl")
    assert [(r["step"], r["loss"]) for r in log if "loss" in r] == [(1, 1.0), (2, 0.9), (3, 0.7)]
    assert [r["event"] for r in log if "event" in r] == ["start", "resumed", "start", "end"]
    assert m.state == {"step": 3, "loss": 0.7, "val_loss": 0.5, "trainable_params": 5, "peak_memory_mb": 12.0}


class _Tracker:
    def __init__(self):
        self.metrics: list[tuple[str, float, int]] = []

        self.fail = 0  # the next calls of log_metrics that raise (an MLflow hiccup)

    def log_metrics(self, run_id, batch):
        if self.fail:
            self.fail -= 1
            raise ConnectionError("mlflow: 503")
        self.metrics.extend(batch)

    def log_image(self, run_id, png, key, step):
        pass


def test_a_report_waits_until_the_driver_has_written_what_rank_0_logged_before_it(ray_local, tmp_path, monkeypatch):
    """ASHA may stop a trial on any report, and its stop ends the trial driver: what rank 0
    logged before the report must be in train_log.jsonl and MLflow by then. A trial stopped
    right after its step-3 report lost that step's lines (a CI run of .ci/e2e)."""
    import ray

    from sar_ray.train import ProgressChannel, _Progress
    from sar_ray.trial import TrialMonitor

    tracker = _Tracker()
    m = TrialMonitor(tmp_path / "trial", tracker, "run", interval=5.0)  # polls rarely: the report must not wait for it
    m.start()
    try:
        progress = _Progress(m.channel, 0)
        seen = []
        report = progress.settled(lambda metrics, checkpoint=None: seen.append(
            (read_log(m.log_path), list(tracker.metrics), metrics)))
        progress.log({"step": 3, "loss": 0.5, "lr": 1e-4})
        progress.log({"step": 3, "quick/stats/js": 0.25, "time": 0.0})
        report({"step": 3, "quick/stats/js": 0.25})
        log, metrics, reported = seen[0]
        assert [r["step"] for r in log] == [3, 3] and log[1]["quick/stats/js"] == 0.25
        assert {("train/loss", 0.5, 3), ("quick/stats/js", 0.25, 3)} <= set(metrics)
        assert reported == {"step": 3, "quick/stats/js": 0.25}
        # MLflow failed the flush the report waited for: the points are kept and sent again
        # before the report goes through, not dropped.
        tracker.fail = 1
        progress.log({"step": 4, "loss": 0.4})
        report({"step": 4})
        assert ("train/loss", 0.4, 4) in seen[1][1] and tracker.fail == 0
    finally:
        m.stop()

    # A driver that no longer drains holds a report for SETTLE_TIMEOUT at most, and the report goes through.
    monkeypatch.setattr(_Progress, "SETTLE_TIMEOUT", 0.3)
    orphan = ProgressChannel.remote()
    progress = _Progress(orphan, 0)
    progress.log({"step": 1, "loss": 1.0})
    got = []
    progress.settled(lambda metrics, checkpoint=None: got.append(metrics))({"step": 1})
    assert got == [{"step": 1}]
    ray.kill(orphan)


def test_a_flush_that_mlflow_fails_midway_sends_the_rest_later_and_nothing_twice(ray_local, tmp_path):
    """A batch goes to MLflow in chunks; when a later chunk failed, the whole batch was kept and
    sent again, so the chunks that had gone through appeared twice in the run."""
    from sar_ray.trial import TrialMonitor

    class Flaky(_Tracker):
        def log_metrics(self, run_id, batch):
            if len(self.metrics) >= TrialMonitor.CHUNK and self.fail:  # the second chunk fails once
                self.fail -= 1
                raise ConnectionError("mlflow: 503")
            self.metrics.extend(batch)

    tracker = Flaky()
    tracker.fail = 1
    m = TrialMonitor(tmp_path / "trial", tracker, "run")
    try:
        points = [("train/loss", float(i), i) for i in range(int(2.5 * TrialMonitor.CHUNK))]
        m._pending = list(points)
        with pytest.raises(ConnectionError):
            m.flush()
        assert len(tracker.metrics) == TrialMonitor.CHUNK and len(m._pending) == len(points) - TrialMonitor.CHUNK
        m.flush()
        assert tracker.metrics == points and m._pending == []
    finally:
        m.stop()


def test_the_channel_keeps_a_senders_order_when_ray_runs_its_calls_out_of_order(ray_local):
    """Ray runs an async actor's calls out of order, even from one caller: a settle or flush
    that ran before the puts sent ahead of it returned at once (a CI run lost a local trial's
    last step, and a report came before its lines were written)."""
    import ray

    from sar_ray.train import ProgressChannel

    ch = ProgressChannel.remote()
    try:
        ray.get(ch.put.remote("a", 1, [{"step": 2}]))  # the second put came in first
        assert ray.get(ch.drain.remote()) == ([], False)  # held until the first is in
        assert not ray.get(ch.arrived.remote("a", 2, 0.05))
        assert not ray.get(ch.settle.remote("a", 2, 0.05))
        # A settle that waits for its own puts owes the driver nothing: drain still waits (the
        # driver does not spin on it).
        waiting = ch.settle.remote("a", 2, 5.0)
        time.sleep(0.2)  # it is waiting
        t = time.monotonic()
        records, _ = ray.get(ch.drain.remote(0, 0.5))
        assert records == [] and time.monotonic() - t >= 0.45
        ray.get(ch.put.remote("a", 0, [{"step": 1}]))
        assert ray.get(ch.arrived.remote("a", 2, 0.05))
        records, settling = ray.get(ch.drain.remote())
        assert [r["step"] for r in records] == [1, 2] and settling
        ray.get(ch.written.remote(2))
        assert ray.get(waiting)
        ray.get(ch.put.remote("a", 2, [{"step": 2}]))
        records, _ = ray.get(ch.drain.remote(2))  # holds the first two: they leave the channel
        assert records == [{"step": 2}]
        assert not ray.get(ch.settle.remote("a", 3, 0.05))  # drained, not yet written
        ray.get(ch.written.remote(3))
        ray.get(ch.written.remote(1))  # a stale confirmation that ran late changes nothing
        assert ray.get(ch.settle.remote("a", 3, 0.05))
        ray.get(ch.put.remote("b", 0, [{"step": 3}]))  # a restarted rank 0 numbers from 0 again
        assert ray.get(ch.drain.remote(3))[0] == [{"step": 3}]
        assert ray.get(ch.drain.remote(1)) == ([{"step": 3}], False)  # a stale call drops nothing more
    finally:
        ray.kill(ch)


def test_a_drain_whose_reply_the_driver_never_read_loses_no_record(ray_local, tmp_path):
    """The driver polls the channel with a timeout; on a loaded machine a poll timed out, Ray
    still ran the drain, and the records it handed out were gone: a CI run's local trial lost
    its whole log, its final loss included (TrialResult.loss None). Records leave the channel
    only when the driver asks for those after them."""
    import ray

    from sar_ray.train import _Progress
    from sar_ray.trial import TrialMonitor

    m = TrialMonitor(tmp_path / "trial", None, None)  # not started: it polls only when told
    try:
        progress = _Progress(m.channel, 0)
        progress.log({"step": 2, "loss": 0.9})
        progress.log({"step": 3, "loss": 0.8})
        progress.flush()
        ray.get(m.channel.drain.remote(0))  # the reply a timed-out poll never read
        m.poll()
        assert m.state["step"] == 3 and m.state["loss"] == 0.8
        progress.log({"step": 4, "loss": 0.7})
        progress.flush()
        ray.get(m.channel.drain.remote(0))  # stale, and late: it repeats what the driver holds
        m.poll()
        m.poll()
        assert [(r["step"], r["loss"]) for r in read_log(m.log_path)] == [(2, 0.9), (3, 0.8), (4, 0.7)]
    finally:
        m.stop()


def test_resume_after_a_crash_reproduces_the_uninterrupted_losses(in_tmp, monkeypatch):
    # 12 scenes: ~5 batches an epoch, so the crash (step 7) and the resume (step 6) fall in the
    # second epoch, whose seeded permutation the resumed run must replay.
    sets = ("strategy.unet.mode=full", "strategy.text_encoder.mode=lora", "strategy.token=learn",
            "train.max_steps=8", "train.ema.enabled=true", "tracking.enabled=false", "data.flip=true",
            "data.caption_dropout=0.3", "data.synthetic.n=12", "sample.seeds=[0]")
    straight = run_trial(small_cfg(in_tmp, *sets, out="straight"), progress=False)

    cfg = small_cfg(in_tmp, *sets, out="resumed")
    monkeypatch.setenv("SAR_RAY_CRASH_AT_STEP", "7")
    with pytest.raises(Exception, match="simulated crash after step 7"):
        run_trial(cfg, progress=False)
    assert (cfg.out_dir / "checkpoints" / "step-000006" / "state.json").is_file()
    monkeypatch.delenv("SAR_RAY_CRASH_AT_STEP")
    resumed = run_trial(cfg, progress=False)

    log = read_log(resumed.out / "train_log.jsonl")
    assert any(rec.get("event") == "resumed" and rec["step"] == 6 for rec in log)
    a = {rec["step"]: rec for rec in read_log(straight.out / "train_log.jsonl") if "loss" in rec}
    b = {rec["step"]: rec for rec in log if "loss" in rec}
    assert sorted(b) == list(range(1, 9)) and a[8]["epoch"] >= 1  # it did cross an epoch
    assert [b[s]["loss"] for s in range(7, 9)] == [a[s]["loss"] for s in range(7, 9)]  # bit-identical on CPU


def test_bf16_trial_trains_validates_and_samples_on_cpu(in_tmp):
    """The reference study's precision (bf16 frozen weights, upcast VAE, bf16 autocast) with
    gradient checkpointing and intermediate samples: sampling used to crash with
    `Input type (c10::BFloat16) and bias type (float) should be the same`."""
    cfg = small_cfg(in_tmp, "model.weight_dtype=bf16", "model.vae_force_upcast=true", "train.mixed_precision=bf16",
                    "train.gradient_checkpointing=true", "strategy.unet.mode=full", "strategy.text_encoder.mode=lora",
                    "strategy.token=learn", "train.sample_every=2", "tracking.enabled=false", "sample.seeds=[0]",
                    model="tiny-sdxl")
    r = run_trial(cfg, progress=False)
    assert r.step == 4 and np.isfinite(r.loss) and np.isfinite(r.val_loss)
    from sar_ray.data import read_image

    for folder in (r.out / "samples" / "step-000002", r.samples):
        images = [read_image(p) for p in sorted(folder.glob("*.png")) if p.name != "grid.png"]
        assert len(images) == 2 and all(np.isfinite(a).all() and np.ptp(a) > 0 for a in images), folder


def _safetensors_layout(folder: Path) -> dict[str, dict[str, tuple]]:
    from safetensors import safe_open

    layout = {}
    for f in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            layout[str(f.relative_to(folder))] = {k: tuple(st.get_slice(k).get_shape()) for k in st.keys()}
    return layout


@pytest.mark.slow  # local and 2-worker DDP trials: ~60 s on 2 cores
def test_zero_and_two_ddp_workers_train_and_save_the_same_things(in_tmp):
    sets = ("strategy.unet.mode=lora", "strategy.text_encoder.mode=lora", "strategy.token=learn",
            "tracking.enabled=false", "train.max_steps=2", "sample.seeds=[0]")
    local = run_trial(small_cfg(in_tmp, *sets, out="w0"), progress=False)
    ddp = run_trial(small_cfg(in_tmp, *sets, "scaling.num_workers=2", "scaling.max_failures=1", out="w2"),
                    progress=False)
    assert local.step == ddp.step == 2 and np.isfinite(ddp.loss)
    start = [r for r in read_log(ddp.out / "train_log.jsonl") if r.get("event") == "start"][0]
    assert start["world_size"] == 2
    assert _safetensors_layout(local.weights) == _safetensors_layout(ddp.weights)
    assert sorted(p.name for p in local.samples.iterdir()) == sorted(p.name for p in ddp.samples.iterdir())
    # DDP checkpoints live in Ray Train's storage, local-mode ones in the trial folder.
    assert list((ddp.out / "ray").rglob("state.safetensors"))
    assert list((local.out / "checkpoints").rglob("state.safetensors"))


def test_fewer_validation_images_than_workers_is_refused_before_training(in_tmp):
    # Ray Train splits the validation set equally over the workers: 1 image for 2 workers gave
    # both an empty share, and the trial silently reported no val_loss (nothing for ASHA to rank).
    cfg = small_cfg(in_tmp, "data.val_fraction=0.01", "scaling.num_workers=2", "tracking.enabled=false")
    with pytest.raises(config.ConfigError, match=r"data.val_fraction 0.01: 1 validation image\(s\) .* "
                                                r"scaling.num_workers 2.*raise data.val_fraction"):
        run_trial(cfg, progress=False)
    assert not (cfg.out_dir / "config.yaml").exists() and not list(cfg.out_dir.rglob("*.safetensors"))


def test_mlflow_experiment_opens_on_training_runs_and_a_broken_upload_does_not_fail_the_trial(in_tmp, monkeypatch):
    """MLflow 3 opens an untagged experiment on its GenAI pages; and an artifact upload that
    keeps failing is tagged on the run instead of sinking a finished trial."""
    from mlflow.tracking import MlflowClient

    from sar_ray import tracking

    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    real = MlflowClient.log_artifacts

    def flaky(self, run_id, local_dir, artifact_path=None):
        if artifact_path == "weights":
            raise ConnectionError("proxy timed out")
        return real(self, run_id, local_dir, artifact_path)

    monkeypatch.setattr(MlflowClient, "log_artifacts", flaky)
    r = run_trial(small_cfg(in_tmp, "strategy.unet.mode=lora", "train.max_steps=2", "sample.seeds=[0]"), progress=False)
    client = MlflowClient(f"sqlite:///{in_tmp}/mlflow.db")
    exp = client.get_experiment_by_name("test")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    run = client.get_run(r.run_id)
    assert run.info.status == "FINISHED"
    assert "proxy timed out" in run.data.tags["sar_ray.upload_failed.weights"]


def test_trial_run_names_differ_by_what_trains_and_fresh_clears_shared_storage(in_tmp, tmp_path):
    """Train V2 resumes from (storage_path, name): two lrs must not share a name, a longer run must."""
    from sar_ray.train import run_name
    from sar_ray.trial import clear_run_storage

    a = small_cfg(in_tmp, "train.lr=1e-4")
    assert run_name(a) != run_name(small_cfg(in_tmp, "train.lr=2e-4"))
    assert run_name(a) != run_name(small_cfg(in_tmp, "train.seed=1"))
    assert run_name(a) == run_name(small_cfg(in_tmp, "train.lr=1e-4", "train.max_steps=40", "train.eval_every=5"))
    shared = tmp_path / "bucket"
    (shared / run_name(a) / "checkpoint_000001").mkdir(parents=True)
    (shared / "another-run").mkdir()
    clear_run_storage(str(shared), run_name(a))
    assert not (shared / run_name(a)).exists() and (shared / "another-run").is_dir()
    clear_run_storage(f"file://{shared}", "another-run")  # a URI goes through pyarrow's filesystems
    assert not (shared / "another-run").exists()


@pytest.mark.slow
def test_a_crashed_train_worker_is_restarted_in_place_from_its_newest_checkpoint(in_tmp, monkeypatch):
    """num_workers=1 with the default scaling.max_failures: a worker crash after step 3 (the
    newest checkpoint is step 2) is restarted by Ray Train and resumes at step 2, in one fit()."""
    monkeypatch.setenv("SAR_RAY_CRASH_AT_STEP", "3")
    cfg = small_cfg(in_tmp, "scaling.num_workers=1", "strategy.unet.mode=lora", "tracking.enabled=false",
                    "sample.seeds=[0]")
    assert cfg.scaling.max_failures >= 1
    r = run_trial(cfg, progress=False)
    log = read_log(r.out / "train_log.jsonl")
    assert r.step == 4 and any(rec.get("event") == "resumed" and rec["step"] == 2 for rec in log)
    assert sorted(rec["step"] for rec in log if "loss" in rec) == [1, 2, 3, 4]


# --------------------------------------------------------------------------------------------
# object storage (`s3://` against a local S3 server) and unreachable storage paths
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 on 127.0.0.1 (dummy credentials): a bucket `sar-runs`; yields host:port."""
    import os

    moto_server = pytest.importorskip("moto.server")
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    import pyarrow.fs as pafs

    pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", allow_bucket_creation=True).create_dir("sar-runs")
    yield f"{host}:{port}"
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _s3(endpoint: str, path: str) -> str:
    return f"s3://{path}?endpoint_override={endpoint}&scheme=http"


def _s3_keys(endpoint: str, prefix: str) -> set[str]:
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http")
    return {i.path for i in fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
            if i.type == pafs.FileType.File}


def _s3_put(endpoint: str, key: str) -> None:
    import pyarrow.fs as pafs

    with pafs.S3FileSystem(endpoint_override=endpoint, scheme="http").open_output_stream(key) as f:
        f.write(b"x")


def test_fresh_clears_train_runs_on_s3_storage_and_leaves_the_others(s3_server, tmp_path):
    """--fresh on `s3://` storage: `sar-ray trial` clears its own Train run; a sweep clears
    its <study>-* runs (and nothing of another study sharing the bucket)."""
    from sar_ray.sweep import _clear_sweep
    from sar_ray.trial import clear_run_storage, probe_storage

    storage = _s3(s3_server, "sar-runs/team")
    for key in ("trial-a/checkpoint_000001/state.json", "quickstart-t1_00000/checkpoint_000001/state.json",
                "quickstart-t1_00001/checkpoint_000002/state.json", "other-t1_00000/checkpoint_000001/state.json"):
        _s3_put(s3_server, f"sar-runs/team/{key}")
    clear_run_storage(storage, "trial-a")
    assert _s3_keys(s3_server, "sar-runs/team/trial-a") == set()
    study = config.load(None, ["name=quickstart", f"scaling.storage_path={storage}", f"out={tmp_path / 'sweep'}",
                               'search={"space": {"train.lr": {"grid": [1.0e-4]}}}'])
    _clear_sweep(tmp_path / "sweep", study)
    assert _s3_keys(s3_server, "sar-runs/team") == {"sar-runs/team/other-t1_00000/checkpoint_000001/state.json"}
    probe_storage(storage)  # reachable and writable: passes, and leaves no marker behind
    assert _s3_keys(s3_server, "sar-runs/team") == {"sar-runs/team/other-t1_00000/checkpoint_000001/state.json"}


def _refusal(capsys, argv: list[str]) -> str:
    from sar_ray import cli

    assert cli.main(argv) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1, lines  # one line: what, where, how to fix
    return lines[0]


@pytest.mark.parametrize("command", ["trial", "sweep"])
def test_unreachable_storage_is_refused_before_any_compute_with_exit_2(command, s3_server, tmp_path, capsys,
                                                                       monkeypatch):
    import socket

    from sar_ray import trial as trial_mod

    # Nothing may start: the probe must refuse first.
    monkeypatch.setattr(trial_mod, "run_trial", lambda *a, **k: pytest.fail("a trial started"))
    monkeypatch.setattr("sar_ray.sweep.run_sweep", lambda *a, **k: pytest.fail("a sweep started"))
    study = str(Path(__file__).resolve().parents[1] / "sweeps" / "quickstart.yaml")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    line = _refusal(capsys, [command, study, "-q", "--set", f"scaling.storage_path={blocker / 'runs'}"])
    assert "scaling.storage_path=" in line and "a-file/runs" in line and "choose a folder" in line
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    line = _refusal(capsys, [command, study, "-q", "--set", f"scaling.storage_path={_s3(f'127.0.0.1:{closed}', 'sar-runs/x')}"])
    assert "cannot write a file there" in line and "endpoint_override" in line
    line = _refusal(capsys, [command, study, "-q", "--set", f"scaling.storage_path={_s3(s3_server, 'no-such-bucket/x')}"])
    assert "NO_SUCH_BUCKET" in line or "does not exist" in line


def test_outputs_reach_a_driver_that_shares_no_filesystem_with_rank_0(tmp_path):
    """Rank 0 on another node (its trial folder is not the driver's): weights and samples go
    through the run's storage; on a shared filesystem nothing is copied."""
    from sar_ray.train import DRIVER_MARK, fetch_outputs, publish_outputs

    worker, driver = tmp_path / "worker-node" / "trial", tmp_path / "driver-node" / "trial"
    (worker / "weights").mkdir(parents=True)
    (worker / "weights" / "pytorch_lora_weights.safetensors").write_bytes(b"lora")
    (worker / "samples" / "final").mkdir(parents=True)
    (worker / "samples" / "final" / "grid.png").write_bytes(b"png")
    driver.mkdir(parents=True)
    (driver / DRIVER_MARK).write_text("token")
    (driver / "weights").mkdir()
    (driver / "weights" / "stale.safetensors").write_bytes(b"old")  # an earlier run's, replaced
    for uri in (f"file://{tmp_path}/bucket/run/outputs", str(tmp_path / "plain" / "run" / "outputs")):
        assert publish_outputs(worker, {"uri": uri, "token": "token"})
        fetch_outputs(driver, uri)
        assert sorted(p.name for p in (driver / "weights").iterdir()) == ["pytorch_lora_weights.safetensors"]
        assert (driver / "samples" / "final" / "grid.png").read_bytes() == b"png"
    (worker / DRIVER_MARK).write_text("token")  # a shared filesystem: the worker sees the driver's mark
    assert not publish_outputs(worker, {"uri": str(tmp_path / "unused"), "token": "token"})
    assert not (tmp_path / "unused").exists()


def test_the_summary_says_when_its_image_counts_are_upper_bounds():
    """A streamed set skipped in training what did not decode after its header scan, and the
    summary still printed the scan's counts as the images trained on."""
    from sar_ray.trial import TrialResult, summary

    r = TrialResult("t", "unet-full_te-frozen_vae-frozen", Path("o"), Path("o/w"), Path("o/s"), 3, 0.1, 0.2, 1.0,
                    6, 0, 0)
    assert "  data      6 train / 0 val images" in summary(r)
    r.counts_exact = False
    assert "at most 6 train / 0 val images" in summary(r) and "data.on_corrupt=skip" in summary(r)


def test_streamed_shards_contradicting_the_declared_depth_stop_as_a_config_mistake_not_a_training_failure(in_tmp, shards):
    """Streamed shards (data.materialize=never) are first decoded while their batches are
    prepared on Ray Data workers, inside training: a pixel above data.normalization.bits's full
    scale there surfaced as a TrainingError with a resume hint (exit 1; resuming hits it again).
    It is the user's config mistake: DepthError, one line naming the sample and the fix (exit 2)."""
    from sar_ray.data.normalize import DepthError
    from sar_ray.train import TrainingError

    shards.write_sarlo(in_tmp / "wds", n_shards=2, per_shard=4, shape=(32, 32))  # amplitudes up to 7000
    cfg = small_cfg(in_tmp, f"data.path={in_tmp / 'wds'}", "data.image_column=sar.png",
                    "data.text_column=caption.MID", "data.normalization.method=none", "data.normalization.bits=12",
                    "data.materialize=never", "data.val_fraction=0", "data.holdout_fraction=0",
                    "tracking.enabled=false")
    with pytest.raises(DepthError) as info:
        run_trial(cfg, progress=False)
    assert not isinstance(info.value, TrainingError)
    message = str(info.value)
    assert "\n" not in message and "resume" not in message
    assert "a pixel of 7000 is above the full scale 4095 that data.normalization.bits=12" in message
    assert "shard-00000" in message and "at least 13" in message


def test_our_messages_are_found_inside_rays_wrapping():
    from sar_ray.data.normalize import DepthError
    from sar_ray.trial import config_mistake, failure_message

    wrapped = RuntimeError("ray.exceptions.RayTaskError(UserCodeException): ray::_prepare_batch()\n"
                           "  File \"x.py\", line 3, in f\n"
                           "sar_ray.data.normalize.DepthError: a.png: a pixel of 5000 is above the full scale 4095\n"
                           "\nThe above exception was the direct cause of the following exception:\n")
    assert isinstance(config_mistake(wrapped), DepthError)
    assert str(config_mistake(wrapped)) == "a.png: a pixel of 5000 is above the full scale 4095"
    assert config_mistake(RuntimeError("Traceback\nValueError: nan loss")) is None
    assert failure_message(RuntimeError("x\nsar_ray.trial.TrainingError: loss is NaN at step 3\nmore")) == (
        "loss is NaN at step 3")
    assert failure_message(RuntimeError("Traceback\n  File \"a\"\nValueError: bad\n")) == "ValueError: bad"
