"""sar-ray: find the best way to fine-tune latent diffusion models for SAR imagery."""

__version__ = "0.1.0"
