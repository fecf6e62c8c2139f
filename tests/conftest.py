import os

import pytest

# Tests never reach a hub: tiny models are built from constructors.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_local():
    """One small local Ray for the whole session (starting Ray costs seconds)."""
    import ray

    if not ray.is_initialized():
        # With its dashboard: Ray Train's placement-group cleaner asks the state API (served by
        # the dashboard) whether a trainer's controller is alive.
        ray.init(address="local", num_cpus=2, log_to_driver=False)  # private, never a running cluster
    yield ray


@pytest.fixture(scope="module")
def torch_one_thread():
    """Tiny models: thread start-up costs more than it saves, and on a shared 2-core CI box
    extra threads contend with other jobs (a 3-4x slowdown measured). Restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
