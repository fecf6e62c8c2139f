"""train.py helpers: the per-epoch data order, gradient checkpointing where gradients pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sar_ray import models
from sar_ray.config import load
from sar_ray.strategies import apply
from sar_ray.strategies import enable_checkpointing
from sar_ray.train import EpochOrder

pytestmark = pytest.mark.usefixtures("torch_one_thread")


class _Shard:
    """What Ray Train hands a worker, for 10 rows."""

    def __init__(self, n: int = 10):
        self.n, self.reads = n, 0

    def iter_batches(self, batch_size, batch_format="numpy", **kw):
        self.reads += 1
        for i in range(0, self.n, batch_size):
            idx = np.arange(i, min(i + batch_size, self.n))
            yield {"pixel_values": idx[:, None].astype(np.float32), "text": np.array([f"r{j}" for j in idx], object)}


def _texts(order: EpochOrder, epoch: int, skip: int = 0) -> list[list[str]]:
    return [list(b["text"]) for b in order.epoch(epoch, skip)]


def test_in_memory_order_is_a_fresh_seeded_permutation_each_epoch():
    shard = _Shard()
    order = EpochOrder(shard, batch_size=3, seed=0, rank=0, in_memory=True)
    e0, e1 = _texts(order, 0), _texts(order, 1)
    assert len(e0) == len(e1) == 3  # drop_last: 10 rows -> 3 batches of 3
    assert e0 != e1  # a new order every epoch, not one replayed
    assert len({t for b in e0 + e1 for t in b}) > 9  # drawn from the whole shard
    assert shard.reads == 1  # read once, permuted in memory
    again = EpochOrder(_Shard(), batch_size=3, seed=0, rank=0, in_memory=True)
    assert _texts(again, 1) == e1  # the same seed, the same order
    assert _texts(again, 1, skip=2) == e1[2:]  # a resume mid-epoch continues where it stopped
    other = EpochOrder(_Shard(), batch_size=3, seed=1, rank=0, in_memory=True)
    assert _texts(other, 0) != e0


def _strategy(*sets):
    return load(None, ["strategy.unet.mode=frozen", *sets]).strategy


@pytest.mark.parametrize("sets, unet, te", [
    (["strategy.token=learn"], True, True),  # the token's gradient runs through a frozen UNet
    (["strategy.text_encoder.mode=lora"], True, True),
    (["strategy.unet.mode=lora"], True, False),
    (["strategy.vae.mode=full"], False, False),  # nothing before the UNet trains
])
def test_checkpointing_wherever_a_gradient_passes(sets, unet, te):
    c = models.build_tiny("sd")
    applied = apply(c, _strategy(*sets), default_lr=1e-4)
    enable_checkpointing(c, applied, token="strategy.token=learn" in sets)
    assert c.unet.is_gradient_checkpointing == unet
    assert c.text_encoders[0].is_gradient_checkpointing == te
    if te:  # the gradient still reaches the trainable text side through the checkpointed layers
        emb, _ = models.encode_text(c, ["<SAR> image of a forest"], "cpu")
        c.unet(torch.randn(1, 4, 8, 8), torch.tensor([10]), emb).sample.mean().backward()
        assert all(p.grad is not None for p in applied.trainable_parameters())


def test_fully_tuned_components_stay_fp32_whole_under_bf16_weights():
    """SDXL's first text encoder never trains its last layer and final norm; left in bf16 inside
    a full fp32 encoder they met fp32 activations: `mixed dtype (CPU)` at the first step."""
    from sar_ray.config import ModelConfig
    from sar_ray.diffusion import Batch, compute_loss
    from sar_ray.strategies import full_components
    from sar_ray.strategies import place

    s = _strategy("strategy.text_encoder.mode=full", "strategy.vae.mode=full", "strategy.token=learn")
    c = models.load_components(ModelConfig(pretrained="tiny-sdxl", weight_dtype="bf16"), keep_fp32=full_components(s))
    applied = apply(c, s, default_lr=1e-4)
    place(c, applied, torch.device("cpu"), "bf16", vae_upcast=True)
    assert all(p.dtype == torch.float32 for te in c.text_encoders for p in te.parameters())
    assert c.unet.dtype == torch.bfloat16  # frozen: bf16
    from sar_ray.config import TrainConfig

    px = torch.rand(2, 3, 64, 64) * 2 - 1
    out = compute_loss(c, Batch(px, ["<SAR> a", "<SAR> b"]), TrainConfig(mixed_precision="bf16"),
                       torch.Generator().manual_seed(0), tune_vae=True, resolution=64)
    out.loss.backward()
    assert torch.isfinite(out.loss)


def test_stored_checkpoints_lists_complete_ones_of_the_run_newest_last(tmp_path):
    """What a worker group restarted after a node loss resumes from when Ray Train's controller
    never registered the newest persisted checkpoint: complete folders only (state.json is
    written last), ordered by step, not by name."""
    from sar_ray.checkpoint import save_state
    from sar_ray.train import stored_checkpoints

    run = tmp_path / "storage" / "trial-x"
    for name, step in [("checkpoint_2026-12-02_10-00-09", 10), ("checkpoint_2026-12-02_10-00-01", 5)]:
        save_state(run / name, {"t": torch.zeros(1)}, {"step": step})
    (run / "checkpoint_2026-12-02_10-00-20").mkdir()  # being persisted: no state.json yet
    (run / "checkpoint_2026-12-02_10-00-30").mkdir()
    (run / "checkpoint_2026-12-02_10-00-30" / "state.json").write_text("{trunc")  # torn
    (run / "outputs").mkdir()
    assert [s for s, _ in stored_checkpoints(str(run))] == [5, 10]
    assert stored_checkpoints(str(run))[-1][1].endswith("checkpoint_2026-12-02_10-00-09")
    assert stored_checkpoints(str(tmp_path / "nothing-here")) == []


@pytest.mark.slow  # a 2-worker Ray Train trial: about a minute
def test_two_workers_sample_their_share_and_match_one_process_sampling_the_saved_weights(tmp_path, monkeypatch,
                                                                                        ray_local):
    """Final and intermediate samples: each of 2 Ray Train workers denoises half the rows, and
    the folder rank 0 writes is, byte for byte, what one process writes from the saved weights."""
    import json

    from sar_ray.sample import generate, load_pipeline
    from sar_ray.trial import run_trial

    monkeypatch.chdir(tmp_path)
    cfg = load(None, [
        "model.pretrained=tiny-sd", "data.synthetic.n=16", "data.synthetic.size=32", "data.resolution=32",
        "data.val_fraction=0", "train.max_steps=2", "train.batch_size=2", "train.eval_every=2",
        "train.checkpoint_every=2", "train.sample_every=1", "strategy.unet.mode=lora",
        'sample.prompts=["<SAR> image of a forest", "<SAR> image of water"]', "sample.seeds=[0, 3]",
        "sample.steps=2", "scaling.num_workers=2", "tracking.enabled=false", f"out={tmp_path / 'w2'}",
    ]).trial()
    r = run_trial(cfg, progress=False)
    events = [json.loads(x) for x in (r.out / "train_log.jsonl").read_text().splitlines()]
    shares = {e["folder"]: e["rows_per_rank"] for e in events if e.get("event") == "samples"}
    assert shares == {"step-000001": [2, 2], "final": [2, 2]}
    pipe = load_pipeline(cfg.model, r.weights, cfg.sample.scheduler)
    alone = generate(pipe, cfg.sample, cfg.sample_resolution, tmp_path / "alone", normalization=cfg.data.normalization)
    names = sorted(p.name for p in alone.folder.iterdir())
    assert sorted(p.name for p in r.samples.iterdir()) == names and len(names) == 7  # 4 PNGs, grid, 2 files
    for name in names:
        assert (r.samples / name).read_bytes() == (alone.folder / name).read_bytes(), name
    assert not (r.out / ".weights-saved").exists()


def test_the_final_loss_is_the_last_logged_one_with_no_second_reduction(tmp_path, monkeypatch):
    """The last step always logs its loss, a mean over workers (a collective and a host sync);
    the finish phase reuses it instead of reducing the same loss again."""
    from sar_ray import train
    from sar_ray.trial import run_trial

    monkeypatch.chdir(tmp_path)
    calls: list[float] = []
    mean = train._mean_over_workers

    def counted(value, device):
        calls.append(mean(value, device))
        return calls[-1]

    monkeypatch.setattr(train, "_mean_over_workers", counted)
    cfg = load(None, [
        "model.pretrained=tiny-sd", "data.synthetic.n=8", "data.synthetic.size=32", "data.resolution=32",
        "data.val_fraction=0", "train.max_steps=3", "train.batch_size=2", "train.log_every=2",
        "train.eval_every=100", "train.checkpoint_every=100", 'sample.prompts=["<SAR> image of a forest"]',
        "sample.seeds=[0]", "sample.steps=1", "tracking.enabled=false", f"out={tmp_path / 'w'}",
    ]).trial()
    r = run_trial(cfg, progress=False)
    assert len(calls) == 2  # steps 2 (log_every) and 3 (the last), not a third in the finish phase
    assert r.loss == calls[-1]
