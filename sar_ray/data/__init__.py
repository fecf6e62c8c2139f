"""SAR data: reading images and caption tables, SAR normalisation, synthetic scenes, and the
Ray Data datasets training consumes. Importing this package does not import Ray."""

from sar_ray.data.captions import DataError, Record, read_table
from sar_ray.data.dataset import (
    TrainData,
    build_datasets,
    load_folder_arrays,
    prepare_image,
    split_records,
    stable_hash,
    with_prefix,
)
from sar_ray.data.io import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    read_image,
    read_image_bytes,
    read_pixels,
    read_pixels_bytes,
    write_amplitude_png,
    write_tiff,
)
from sar_ray.data.normalize import NORMALIZERS, normalize, to_model_range, to_three_channels
from sar_ray.data.synth import (
    AMPLITUDE_MAX,
    LABELS,
    generate_scene,
    layout_scene,
    scene_rng,
    speckle,
    synthetic_path,
    write_synthetic,
)

__all__ = [
    "AMPLITUDE_MAX",
    "DataError",
    "IMAGE_EXTENSIONS",
    "ImageReadError",
    "LABELS",
    "NORMALIZERS",
    "Record",
    "TrainData",
    "build_datasets",
    "generate_scene",
    "layout_scene",
    "load_folder_arrays",
    "normalize",
    "prepare_image",
    "read_image",
    "read_image_bytes",
    "read_pixels",
    "read_pixels_bytes",
    "read_table",
    "scene_rng",
    "speckle",
    "split_records",
    "stable_hash",
    "synthetic_path",
    "to_model_range",
    "to_three_channels",
    "with_prefix",
    "write_amplitude_png",
    "write_synthetic",
    "write_tiff",
]
