import os
from pathlib import Path

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


@pytest.fixture(scope="session", autouse=True)
def eval_cache_in_tmp(tmp_path_factory):
    """`eval.cache_dir` defaults to `eval` under sar-ray's cache ($SAR_RAY_CACHE or
    ~/.cache/sar-ray). Tests must not fill the user's cache, and moving $SAR_RAY_CACHE would move
    the tiny natural bases too, which some tests reuse from the real cache; so the default alone
    points at a session tmp folder: every config built in this process, and the trials it sends
    to Ray workers (their configs carry the value), describes references there."""
    from pydantic import BaseModel

    from sar_ray import config

    def rebuild() -> None:
        # Models embedding EvalConfig copy its schema (defaults included) when built: rebuild
        # it, then every model of the module, in definition order (a model after its parts).
        config.EvalConfig.model_rebuild(force=True)
        for model in vars(config).values():
            if isinstance(model, type) and issubclass(model, BaseModel) and model.__module__ == config.__name__ \
                    and model is not config.EvalConfig:
                model.model_rebuild(force=True)

    field = config.EvalConfig.model_fields["cache_dir"]
    home = field.default_factory
    tmp = str(tmp_path_factory.mktemp("eval-cache"))
    field.default_factory = lambda: tmp
    rebuild()
    yield Path(tmp)
    field.default_factory = home
    rebuild()


@pytest.fixture(scope="session")
def shards():
    """`tests/data/shards.py`, the writer of tiny SARLO-80-layout WebDataset shards, imported
    by path so that no test has to put `tests/data` on sys.path (and forget to take it off)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sar_ray_test_shards", Path(__file__).parent / "data" / "shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
