"""MLflow: one run per trial (nested under a sweep's parent run when there is one).

The only module that imports mlflow. It uses `MlflowClient` with explicit run ids rather than
the fluent `mlflow.start_run` state, so a progress thread and several Tune trials in one
process can log side by side without touching each other's "active run".
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable

MAX_PARAM_LEN = 6000  # MLflow's limit on a parameter value
# Folders larger than this (fully tuned SDXL weights are GBs) are recorded by their storage
# path instead of being proxied through the MLflow server.
MAX_UPLOAD_BYTES = 2 * 2**30
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
RUN_FILE = "mlflow_run.json"


class TrackingError(RuntimeError):
    """MLflow cannot be used as configured (unreachable server, unwritable store); exit 2."""


def default_uri(uri: str | None) -> str:
    import os

    return uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def absolute_uri(uri: str) -> str:
    """`sqlite:///mlflow.db` is relative to the current directory; Tune trials run elsewhere."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any training, when the tracking store cannot be reached."""
    fix = ("start one with `mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///mlflow.db`, "
           "pass --tracking-uri, or unset MLFLOW_TRACKING_URI to use the local sqlite:///mlflow.db")
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
                if r.status != 200:
                    raise TrackingError(f"MLflow server {uri} answered {r.status} on /health; {fix}")
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingError(f"MLflow server {uri} is unreachable ({reason}); {fix}") from None
    elif uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        parent = db.parent if str(db.parent) else Path(".")
        if not parent.is_dir():
            raise TrackingError(f"MLflow store {uri}: folder {parent} does not exist; create it or change --tracking-uri")
    elif uri.startswith("file:") or "://" not in uri:
        raise TrackingError(
            f"MLflow store {uri}: the file store (./mlruns) is deprecated in MLflow 3; use sqlite:///mlflow.db or a server"
        )


def _stringify(value: Any) -> str:
    s = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return s if len(s) <= MAX_PARAM_LEN else s[: MAX_PARAM_LEN - 3] + "..."


class Tracker:
    """A thin wrapper around MlflowClient for one experiment."""

    def __init__(self, uri: str, experiment: str):
        import logging

        import mlflow
        from mlflow.tracking import MlflowClient

        # mlflow installs its own INFO handler on import ("Updating database tables", ...).
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        check_reachable(uri)
        self.uri = uri
        mlflow.set_tracking_uri(uri)
        self.client = MlflowClient(tracking_uri=uri)
        try:
            exp = self.client.get_experiment_by_name(experiment)
            self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        except Exception as e:  # noqa: BLE001 - any store failure is a configuration problem here
            raise TrackingError(f"MLflow store {uri}: cannot open experiment {experiment!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        self.experiment = experiment
        self._tag_training_experiment()

    def _tag_training_experiment(self) -> None:
        """MLflow 3's UI opens an untagged experiment on its GenAI (traces) pages; this tag
        makes it open on the training runs."""
        exp = self.client.get_experiment(self.experiment_id)
        if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)

    # ------------------------------------------------------------------ runs
    def start_run(self, run_name: str, tags: dict[str, str] | None = None, parent_run_id: str | None = None,
                  resume_run_id: str | None = None) -> str:
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        if resume_run_id:
            try:
                run = self.client.get_run(resume_run_id)
                if run.info.experiment_id == self.experiment_id:
                    self.client.update_run(resume_run_id, status="RUNNING")
                    self.client.set_tag(resume_run_id, "sar_ray.resumed_at", time.strftime("%Y-%m-%dT%H:%M:%S"))
                    return resume_run_id
            except Exception:  # noqa: BLE001 - a run from another store: start a new one
                pass
        all_tags = {"sar_ray.started_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **(tags or {})}
        if parent_run_id:
            all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
        return run.info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def run_status(self, run_id: str) -> str | None:
        """RUNNING / FINISHED / FAILED / KILLED, or None for a run this store does not have."""
        try:
            return self.client.get_run(run_id).info.status
        except Exception:  # noqa: BLE001 - another store, a deleted run
            return None

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, _stringify(v)) for k, v in tags.items()])

    # ------------------------------------------------------------------ data
    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        items = [Param(k, _stringify(v)) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, records: Iterable[tuple[str, float, int]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, int(step)) for k, v, step in records if v is not None]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(run_id, metrics=metrics[i : i + 1000])

    def log_artifacts(self, run_id: str, local_dir: str | Path, artifact_path: str | None = None) -> bool:
        """Upload a folder; one too large for the server's proxy (full-UNet weights: GBs) is
        recorded by its path instead. Never raises: see `_upload`."""
        local_dir = Path(local_dir)
        size = sum(p.stat().st_size for p in local_dir.rglob("*") if p.is_file()) if local_dir.is_dir() else 0
        if size > MAX_UPLOAD_BYTES:
            self.set_tags(run_id, {f"sar_ray.uri.{artifact_path or local_dir.name}": str(local_dir.resolve()),
                                   f"sar_ray.not_uploaded.{artifact_path or local_dir.name}":
                                       f"{size / 2**30:.1f} GiB > {MAX_UPLOAD_BYTES / 2**30:.0f} GiB: kept in storage"})
            return False
        return self._upload(run_id, artifact_path or local_dir.name,
                            lambda: self.client.log_artifacts(run_id, str(local_dir), artifact_path))

    def log_artifact(self, run_id: str, local_file: str | Path, artifact_path: str | None = None) -> bool:
        return self._upload(run_id, Path(local_file).name,
                            lambda: self.client.log_artifact(run_id, str(local_file), artifact_path))

    def log_image(self, run_id: str, png: bytes, key: str, step: int) -> bool:
        """A PNG (an intermediate sample grid) under `key` at `step`: the MLflow UI shows it
        in the run's image grid with a step slider. Never raises: see `_upload`."""
        import io

        from PIL import Image

        image = Image.open(io.BytesIO(png))
        image.load()
        return self._upload(run_id, f"image.{key}", lambda: self.client.log_image(run_id, image, key=key, step=int(step)))

    def _upload(self, run_id: str, what: str, call, attempts: int = 3) -> bool:
        """An upload retried with backoff; if it still fails the run is tagged with the error
        instead: a slow or broken artifact store must not turn a finished trial into a failed
        one (and a retrain)."""
        error = None
        for i in range(attempts):
            try:
                call()
                return True
            except Exception as e:  # noqa: BLE001 - any store / network error
                error = e
                time.sleep(min(2.0**i, 8.0))
        try:
            self.set_tags(run_id, {f"sar_ray.upload_failed.{what}": f"{type(error).__name__}: {error}"[:5000]})
        except Exception:  # noqa: BLE001 - the store is down altogether: nothing more to record
            pass
        return False

    def run_url(self, run_id: str) -> str:
        if self.uri.startswith(("http://", "https://")):
            return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}"
        return f"mlflow ui --backend-store-uri {self.uri}  (experiment {self.experiment!r}, run {run_id})"


def remembered_run(out: Path, uri: str) -> str | None:
    """The MLflow run a trial folder already logged to (so a resumed trial continues it)."""
    p = out / RUN_FILE
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError:
        return None
    return data.get("run_id") if data.get("uri") == uri else None


def remember_run(out: Path, uri: str, run_id: str) -> None:
    (out / RUN_FILE).write_text(json.dumps({"uri": uri, "run_id": run_id}))
