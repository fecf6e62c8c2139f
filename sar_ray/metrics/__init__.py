"""SAR realism metrics: pure functions on numpy arrays (no Ray, no MLflow, no files).

- :mod:`sar_ray.metrics.statistics`: amplitude histogram distances (KL, JS, Wasserstein, KS),
  speckle descriptors (ENL, coefficient of variation, log-cumulants, Gamma / K fits), the
  Frechet distance;
- :mod:`sar_ray.metrics.glcm`: GLCM texture properties equal to scikit-image's, vectorised,
  and set-level texture distances;
- :mod:`sar_ray.metrics.clip`: SAR-CLIP (open_clip) build / train / load and its metrics
  (imports torch; import it explicitly).

``sar_ray.evaluate`` runs these over image folders with Ray Data.
"""

from sar_ray.metrics.glcm import (
    GLCM_PROPS,
    descriptor_names,
    glcm_descriptors,
    glcm_offsets,
    glcm_props,
    glcm_props_skimage,
    quantize,
    set_distances,
)
from sar_ray.metrics.statistics import (
    CDF_BINS,
    DESCRIPTORS,
    amplitude_histogram,
    coefficient_of_variation,
    descriptor_gaps,
    enl,
    frechet_distance,
    histogram_distances,
    js_divergence,
    kl_divergence,
    ks_from_histograms,
    log_cumulants,
    sar_descriptors,
    wasserstein_from_histograms,
)

#: The study's marker token; SAR-CLIP never sees it (see :func:`caption_for_clip`).
DEFAULT_PREFIX = "<SAR>"


def caption_for_clip(text: str, strip_prefix: str | None = DEFAULT_PREFIX) -> str:
    """`text` without a leading `strip_prefix` token: the evaluator judges a prompt's content,
    not the study's marker token (which a SAR-CLIP trained on plain captions never saw)."""
    text = str(text).strip()
    if strip_prefix and text.startswith(strip_prefix):
        text = text[len(strip_prefix):].strip()
    return text


__all__ = [
    "CDF_BINS",
    "DEFAULT_PREFIX",
    "DESCRIPTORS",
    "GLCM_PROPS",
    "amplitude_histogram",
    "caption_for_clip",
    "coefficient_of_variation",
    "descriptor_gaps",
    "descriptor_names",
    "enl",
    "frechet_distance",
    "glcm_descriptors",
    "glcm_offsets",
    "glcm_props",
    "glcm_props_skimage",
    "histogram_distances",
    "js_divergence",
    "kl_divergence",
    "ks_from_histograms",
    "log_cumulants",
    "quantize",
    "sar_descriptors",
    "set_distances",
    "wasserstein_from_histograms",
]
