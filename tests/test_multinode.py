"""Multi-node paths on one machine: `ray.cluster_utils.Cluster` runs a head and a worker node
(separate raylets, each with its own resources and temporary directory). Custom resources
stand in for node types (a worker asking for `GPU` would look for CUDA).

    python -m pytest -m slow tests/test_multinode.py
"""

import json
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from sar_ray import config

pytestmark = pytest.mark.slow

PROMPT = '["<SAR> image of open water"]'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A CPU head advertising `trial_driver` (the stable node type of cluster.yaml) and one
    worker node with 2 CPUs (the "GPU" node type: `worker_node`). Short temp dirs: Ray's socket
    paths must stay under the kernel's 107 characters. The session's local Ray, if any, is
    restored afterwards."""
    import ray
    from ray.cluster_utils import Cluster

    was_local = ray.is_initialized()
    ray.shutdown()
    roots = [Path(tempfile.mkdtemp(prefix="rn", dir="/tmp")) for _ in range(3)]
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"trial_driver": 10}, "temp_dir": str(roots[0]), "gcs_server_port": _free_port(),
        "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": _free_port(),
        "dashboard_agent_listen_port": _free_port()})
    # Connect while the head is the only raylet: the driver attaches to a raylet of its own IP,
    # and must stay on the head (the node-loss test removes the other one).
    ray.init(address=c.address, log_to_driver=False)
    worker = c.add_node(num_cpus=2, resources={"worker_node": 1}, temp_dir=str(roots[1]))
    c.temp_roots = roots
    c.worker = worker
    yield c
    ray.shutdown()
    c.shutdown()
    for r in roots:
        shutil.rmtree(r, ignore_errors=True)
    if was_local:
        ray.init(address="local", num_cpus=2, log_to_driver=False)


def _study(tmp_path: Path, *sets: str):
    return config.load(None, [
        "model.pretrained=tiny-sd", f"out={tmp_path / 'out'}", "data.synthetic.n=16", "data.synthetic.size=32",
        "data.resolution=32", "data.val_fraction=0.25", "train.batch_size=2", "train.eval_batches=1",
        f"sample.prompts={PROMPT}", "sample.seeds=[0]", "sample.steps=1", "tracking.enabled=false",
        'search={"space": {"train.lr": {"grid": [1.0e-4]}}}', *sets,
    ])


def _node_of(resources: dict) -> str:
    import ray

    @ray.remote(num_cpus=resources.get("CPU", 0),
                resources={k: v for k, v in resources.items() if k not in ("CPU", "GPU")})
    def where() -> str:
        return ray.get_runtime_context().get_node_id()

    return ray.get(where.remote(), timeout=120)


def test_trial_drivers_land_on_the_node_advertising_trial_driver(cluster, tmp_path):
    """Train V2 pins a trial's controller to its driver's node: drivers must stay on the
    stable node type even where another node has more free CPUs."""
    import ray

    from sar_ray.sweep import trial_resources

    cfg = _study(tmp_path, "scaling.num_workers=1").trial()
    res = trial_resources(cfg, ray.cluster_resources())
    assert res.get("trial_driver")
    head = cluster.head_node.node_id
    assert {_node_of(res) for _ in range(4)} == {head}
    # Without the resource nothing ties a driver to the head: the worker node can take it.
    assert _node_of({"CPU": 0.1, "worker_node": 0.01}) == cluster.worker.node_id


def test_each_raylet_has_its_own_temp_dir_and_node_local_paths_are_refused(cluster, tmp_path):
    """What resolves on one node only (a relative `out`, which `ray job submit` puts in a
    per-node temporary working directory; a SQLite tracking file) is refused when more than
    one node is alive."""
    import ray

    from sar_ray.config import ConfigError
    from sar_ray.sweep import check_cluster_paths

    sockets = {n["NodeID"]: n["RayletSocketName"] for n in ray.nodes() if n["Alive"]}
    assert len(sockets) >= 2
    owners = {next(str(r) for r in cluster.temp_roots if s.startswith(str(r))) for s in sockets.values()}
    assert len(owners) == len(sockets)  # one temp root per raylet
    with pytest.raises(ConfigError, match="absolute path on storage every node mounts"):
        check_cluster_paths(_study(tmp_path, "out=runs/x"))
    with pytest.raises(ConfigError, match="trials log from other nodes"):
        check_cluster_paths(_study(tmp_path, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"))
    check_cluster_paths(_study(tmp_path, "tracking.uri=http://127.0.0.1:5000"))  # absolute out, a server


def test_losing_the_worker_node_mid_trial_resumes_from_the_newest_checkpoint(cluster, tmp_path):
    """The trial's only Train worker needs 2 CPUs, which only the worker node has. Once its
    first checkpoint is on storage that node is removed (a preempted spot node) and a new one
    joins (the autoscaler replacing it): Ray Train restarts the worker group there
    (scaling.max_failures) from the newest checkpoint, and the trial finishes."""
    from sar_ray.trial import read_log, run_trial

    storage = tmp_path / "shared"
    cfg = _study(tmp_path, "scaling.num_workers=1", "scaling.cpus_per_worker=2", "train.max_steps=60",
                 "train.eval_every=3", "train.checkpoint_every=3", f"scaling.storage_path={storage}",
                 "strategy.unet.mode=lora").trial()
    assert cfg.scaling.max_failures >= 1
    seen: dict = {}

    def train() -> None:
        try:
            seen["result"] = run_trial(cfg, progress=False)
        except BaseException as e:  # noqa: BLE001 - asserted below
            seen["error"] = e

    # The trial trains in a thread; nodes are removed and added from the main thread (Ray's
    # node processes install signal handlers, which only the main thread may do).
    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    while thread.is_alive() and "step" not in seen:
        done = list(storage.glob("*/checkpoint_*/state.json"))
        if done:
            seen["step"] = json.loads(done[0].read_text())["meta"]["step"]
            cluster.remove_node(cluster.worker, allow_graceful=False)
            cluster.worker = cluster.add_node(num_cpus=2, resources={"worker_node": 1},
                                              temp_dir=str(cluster.temp_roots[2]))
        time.sleep(0.25)
    thread.join()
    assert "error" not in seen, seen.get("error")
    r = seen["result"]
    assert seen.get("step"), "the node was never removed"
    log = read_log(r.out / "train_log.jsonl")
    resumed = [rec["step"] for rec in log if rec.get("event") == "resumed"]
    events = [(rec["event"], rec.get("step")) for rec in log if "event" in rec]
    assert resumed and min(resumed) >= seen["step"], (events, seen.get("step"))
    assert r.step == 60 and sorted(rec["step"] for rec in log if "loss" in rec) == list(range(1, 61))
    assert (r.weights / "pytorch_lora_weights.safetensors").is_file()
