"""`sample.generate`'s folder: what `sar-ray evaluate` needs to know it is model output."""

import json
from types import SimpleNamespace

import pytest
import torch

from sar_ray.config import EvalConfig, NormalizationConfig, SampleConfig
from sar_ray.evaluate import generated_normalization, is_model_output
from sar_ray.sample import generate


class FakeVae(torch.nn.Module):
    """Decodes latents (B, 4, h, w) to a flat grey image (B, 3, 8h, 8w) of their mean."""

    config = SimpleNamespace(scaling_factor=1.0)

    def __init__(self):
        super().__init__()
        self.post_quant_conv = torch.nn.Conv2d(4, 4, 1)

    def decode(self, z):
        img = z.mean(dim=1, keepdim=True).tanh().repeat(1, 3, 8, 8)
        return SimpleNamespace(sample=img)


class FakePipe:
    def __init__(self):
        self.vae = FakeVae()
        self.unet = SimpleNamespace(device=torch.device("cpu"))
        self.components = {"vae": self.vae}

    def __call__(self, prompt, height, width, generator, **kw):
        # Each image from its own generator, shifted by its prompt: a row given the wrong
        # prompt or seed shows.
        latents = torch.stack([torch.randn(4, height // 8, width // 8, generator=g) + 0.1 * len(p)
                               for p, g in zip(prompt, generator)])
        return SimpleNamespace(images=latents)


def test_sample_folder_declares_itself_model_output(tmp_path):
    cfg = SampleConfig(prompts=["<SAR> image of a forest", "<SAR> image of water"], seeds=[0, 1], steps=1)
    out = generate(FakePipe(), cfg, 16, tmp_path / "samples")
    assert is_model_output(out.folder)
    marker = json.loads((out.folder / "samples.json").read_text())
    assert marker["images"] == 4 and marker["prompts"] == cfg.prompts and marker["seeds"] == [0, 1]
    norm, how = generated_normalization(out.folder, EvalConfig())
    assert norm.method == "none" and "samples.json" in how["why"]
    assert not is_model_output(tmp_path)  # any other folder: normalised like the reference


def test_sample_folder_records_the_training_normalisation(tmp_path):
    cfg = SampleConfig(prompts=["<SAR> image of a forest"], seeds=[0], steps=1)
    db = NormalizationConfig(method="db", db_min=-25.0)
    out = generate(FakePipe(), cfg, 16, tmp_path / "samples", normalization=db)
    assert json.loads((out.folder / "samples.json").read_text())["normalization"] == db.model_dump(mode="json")


# ------------------------------------------------------------------------------- data-parallel sampling

ROWS_CFG = dict(prompts=["<SAR> image of a forest", "<SAR> image of water", "<SAR> image of a town"],
                seeds=[0, 1, 7], steps=2, save_tiff=True)  # 9 rows: 5 on rank 0, 4 on rank 1


def _tiny_pipe():
    from sar_ray.models import assemble_pipeline, build_tiny

    return assemble_pipeline(build_tiny("sd", seed=0), "dpm++")


def _sampling_worker(rank: int, world: int, port: int, out: str, q):
    """A rank of a gloo group (the fake pipeline: spawning processes that import diffusers
    costs more than the test; the real one is below, where a row is checked on its own)."""
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = SampleConfig(**ROWS_CFG)
        got = generate(FakePipe(), cfg, 32, f"{out}/split", rank=rank, world_size=world)
        q.put((rank, None if got is None else got.rows_per_rank))
        if rank == 0:  # the single-process folder
            generate(FakePipe(), cfg, 32, f"{out}/alone")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes import torch + diffusers: 150 s on the loaded 2-core box
def test_two_ranks_sample_their_share_and_write_the_folder_one_process_writes(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_sampling_worker, args=(r, 2, port, str(tmp_path), q)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    told = dict(q.get(timeout=5) for _ in procs)
    assert told == {0: [5, 4], 1: None}  # rows[rank::2]; only rank 0 holds the folder
    split, alone = tmp_path / "split", tmp_path / "alone"
    names = sorted(p.name for p in alone.iterdir())
    assert len([n for n in names if n.endswith(".png")]) == 10  # 9 images + grid.png
    assert sorted(p.name for p in split.iterdir()) == names
    for name in names:  # PNGs, TIFFs, grid, metadata.jsonl, samples.json: byte for byte
        assert (split / name).read_bytes() == (alone / name).read_bytes(), name


def test_a_row_does_not_depend_on_the_rows_sampled_with_it(tmp_path, torch_one_thread):
    """What makes the split exact: row (prompt, seed) alone equals the same row of the full set."""
    import numpy as np

    from sar_ray.data.io import read_image

    pipe = _tiny_pipe()
    full = generate(pipe, SampleConfig(**ROWS_CFG), 32, tmp_path / "full")
    one = generate(pipe, SampleConfig(**{**ROWS_CFG, "prompts": ROWS_CFG["prompts"][1:2], "seeds": [7]}), 32,
                   tmp_path / "one")
    want = [p for p in full.images if p.name.endswith("-seed7.png") and "water" in p.name][0]
    got = one.images[0]
    assert np.array_equal(read_image(got), read_image(want))
    assert np.ptp(read_image(got)) > 0  # a real image, not a constant
