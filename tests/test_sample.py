"""`sample.generate`'s folder: what `sar-ray evaluate` needs to know it is model output."""

import json
from types import SimpleNamespace

import torch

from sar_ray.config import EvalConfig, SampleConfig
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
        latents = torch.stack([torch.randn(4, height // 8, width // 8, generator=g) for g in generator])
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
