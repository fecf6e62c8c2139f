"""Amplitude statistics of SAR images: distribution distances and speckle descriptors.

Pure numpy/scipy functions on arrays; no Ray, no files. Images are (H, W) amplitude arrays,
for set comparison normalised to [0, 1] the same way for both sets (see ``sar_ray.evaluate``).

Two kinds of numbers:

- **distribution distances** between the pooled pixel histograms of two sets, computed from
  summed per-image histograms (sufficient statistics, so a pipeline never gathers images):
  KL(reference || generated) with a pseudo-count, Jensen-Shannon (base 2, in [0, 1]),
  1-D Wasserstein and Kolmogorov-Smirnov on [0, 1];
- **speckle descriptors** per image, on intensity I = A^2: equivalent number of looks (ENL),
  coefficient of variation, and the method of log-cumulants (MoLC) fits of the Gamma and K
  distributions. For fully developed L-look speckle on a flat scene ENL = L, CV = 1/sqrt(L),
  the Gamma shape = L and the K texture parameter is infinite (reported as ``K_NU_MAX``).
"""

from __future__ import annotations

import numpy as np
from scipy.special import polygamma

#: Per-image descriptors returned by :func:`sar_descriptors`, in this order.
DESCRIPTORS = ("mean", "std", "enl", "cv", "molc_k1", "molc_k2", "molc_k3", "gamma_looks", "k_nu")
#: Reported K texture parameter when the log-cumulants show no texture (pure speckle).
K_NU_MAX = 100.0
#: Fine histogram resolution for the Wasserstein and KS distances (CDF error <= 1 / CDF_BINS).
CDF_BINS = 4096


# ------------------------------------------------------------------------------- histograms


def amplitude_histogram(images: np.ndarray, bins: int) -> np.ndarray:
    """Counts of pixel values in `bins` equal bins over [0, 1] (values outside are clipped).

    `images`: (H, W) or (N, H, W) floats in [0, 1]. Returns (bins,) int64 (all images pooled);
    sums of these over image batches are the sufficient statistic of every distance below.
    """
    x = np.asarray(images, dtype=np.float64).ravel()
    idx = np.clip((x * bins).astype(np.int64), 0, bins - 1)
    return np.bincount(idx, minlength=bins)


def _probabilities(counts: np.ndarray, pseudo_count: float = 0.0) -> np.ndarray:
    c = np.asarray(counts, dtype=np.float64) + pseudo_count
    total = c.sum()
    if not total > 0:
        raise ValueError("histogram is empty (no pixels)")
    return c / total


def kl_divergence(reference: np.ndarray, generated: np.ndarray, pseudo_count: float = 0.5) -> float:
    """KL(reference || generated) in nats between two histograms of counts.

    `pseudo_count` is added to every bin of both (Krichevsky-Trofimov smoothing by default):
    a bin the generator never fills costs a large but finite amount instead of infinity.
    """
    p = _probabilities(reference, pseudo_count)
    q = _probabilities(generated, pseudo_count)
    m = p > 0
    return float(max(np.sum(p[m] * np.log(p[m] / q[m])), 0.0))


def js_divergence(a: np.ndarray, b: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (in [0, 1], symmetric) between two count histograms."""
    p, q = _probabilities(a), _probabilities(b)
    m = 0.5 * (p + q)

    def kl(x: np.ndarray) -> float:
        nz = x > 0
        return float(np.sum(x[nz] * np.log2(x[nz] / m[nz])))

    return float(min(max(0.5 * kl(p) + 0.5 * kl(q), 0.0), 1.0))


def wasserstein_from_histograms(a: np.ndarray, b: np.ndarray) -> float:
    """1-D Wasserstein (earth mover's) distance on [0, 1] between two count histograms.

    W1 = integral |F_a - F_b|, with each bin's mass at its centre; exact for the binned data.
    """
    fa, fb = np.cumsum(_probabilities(a)), np.cumsum(_probabilities(b))
    return float(np.sum(np.abs(fa - fb)[:-1]) / len(fa))


def ks_from_histograms(a: np.ndarray, b: np.ndarray) -> float:
    """Kolmogorov-Smirnov statistic sup |F_a - F_b| at the bin edges (symmetric, in [0, 1])."""
    fa, fb = np.cumsum(_probabilities(a)), np.cumsum(_probabilities(b))
    return float(np.max(np.abs(fa - fb)))


def histogram_distances(
    reference: np.ndarray,
    generated: np.ndarray,
    reference_fine: np.ndarray | None = None,
    generated_fine: np.ndarray | None = None,
    pseudo_count: float = 0.5,
) -> dict[str, float]:
    """``{kl, js, wasserstein, ks}`` of two sets from their pooled histograms.

    KL and JS use the `hist_bins` histograms; Wasserstein and KS the fine ``CDF_BINS`` ones
    when given (else the same histograms).
    """
    ra = reference if reference_fine is None else reference_fine
    ga = generated if generated_fine is None else generated_fine
    return {
        "kl": kl_divergence(reference, generated, pseudo_count),
        "js": js_divergence(reference, generated),
        "wasserstein": wasserstein_from_histograms(ra, ga),
        "ks": ks_from_histograms(ra, ga),
    }


# ------------------------------------------------------------------------------- speckle


def _intensity(amplitude: np.ndarray) -> np.ndarray:
    a = np.asarray(amplitude, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"expected a (H, W) image, got shape {a.shape}")
    return a * a


def default_enl_window(shape: tuple[int, int]) -> int:
    """Block side for :func:`enl`: 16 px on large images, smaller so a small image has >= 64 blocks."""
    return int(np.clip(min(shape) // 8, 4, 16))


def enl(amplitude: np.ndarray, window: int | None = None, fraction: float = 0.25) -> float:
    """Equivalent number of looks: mean^2 / var of intensity over homogeneous windows.

    Windows are chosen automatically and without bias: the image is cut into `window` x
    `window` blocks, and each block into two checkerboard halves. Half A ranks the blocks by
    their coefficient of variation and keeps the most homogeneous `fraction`; half B, whose
    speckle is independent of that choice, gives the estimate. (Ranking and estimating on
    the same pixels would favour blocks whose speckle happened to be weak, and overestimate
    ENL: by ~40 % for L = 1.) Pooled as sum(mean^2 - var/n) / sum(var), which is exact for
    speckle on blocks of different brightness and removes the 1/n bias of mean^2.
    Returns nan for an image smaller than a window or without a block of positive mean.
    """
    inten = _intensity(amplitude)
    w = window or default_enl_window(inten.shape)
    nr, nc = inten.shape[0] // w, inten.shape[1] // w
    if nr * nc == 0:
        return float("nan")  # smaller than one window
    blocks = inten[: nr * w, : nc * w].reshape(nr, w, nc, w).transpose(0, 2, 1, 3).reshape(nr * nc, w * w)
    checker = ((np.arange(w)[:, None] + np.arange(w)[None, :]) % 2 == 0).ravel()
    half_a, half_b = blocks[:, checker], blocks[:, ~checker]
    mean_a = half_a.mean(axis=1)
    ok = mean_a > 0
    if not ok.any():
        return float("nan")
    cv2_a = half_a[ok].var(axis=1, ddof=1) / mean_a[ok] ** 2
    keep = max(1, int(round(fraction * ok.sum())))
    chosen = np.argsort(cv2_a, kind="stable")[:keep]
    b = half_b[ok][chosen]
    n = b.shape[1]
    mean_b, var_b = b.mean(axis=1), b.var(axis=1, ddof=1)
    den = var_b.sum()
    if not den > 0:
        return float("inf")
    return float(max((mean_b**2 - var_b / n).sum(), 0.0) / den)


def coefficient_of_variation(amplitude: np.ndarray) -> float:
    """std / mean of the intensity over the whole image (1/sqrt(L) for flat L-look speckle).

    Unlike ENL this includes the scene's own heterogeneity: it grows with texture and edges.
    """
    inten = _intensity(amplitude)
    m = inten.mean()
    return float(inten.std(ddof=1) / m) if m > 0 else float("nan")


def log_cumulants(amplitude: np.ndarray) -> tuple[float, float, float]:
    """First three log-cumulants (k1, k2, k3) of the intensity; zero pixels (no data) skipped."""
    inten = _intensity(amplitude)
    pos = inten[inten > 0]
    if pos.size < 3:
        return float("nan"), float("nan"), float("nan")
    ln = np.log(pos)
    k1 = ln.mean()
    d = ln - k1
    return float(k1), float(np.mean(d * d)), float(np.mean(d * d * d))


def inverse_trigamma(y: np.ndarray | float) -> np.ndarray | float:
    """x > 0 with psi_1(x) = y (y > 0), by Newton's method from psi_1(x) ~ 1/x + 1/(2 x^2)."""
    y = np.asarray(y, dtype=np.float64)
    # Initial guess: psi_1(x) ~ 1/x + 1/(2x^2) for large x, ~ 1/x^2 for small x.
    x = np.where(y > 10.0, 1.0 / np.sqrt(y), 0.5 + 1.0 / y)
    for _ in range(60):
        step = (polygamma(1, x) - y) / polygamma(2, x)
        x_new = np.where(x - step > 0, x - step, x / 2)
        if np.all(np.abs(x_new - x) <= 1e-12 * np.abs(x)):
            x = x_new
            break
        x = x_new
    return x if x.ndim else float(x)


def gamma_looks_molc(k2: float) -> float:
    """Gamma (L-look speckle) shape from the second log-cumulant: psi_1(L) = k2."""
    if not (np.isfinite(k2) and k2 > 0):
        return float("nan")
    return float(inverse_trigamma(k2))


def k_texture_molc(k2: float, looks: float, nu_max: float = K_NU_MAX) -> float:
    """K-distribution texture parameter nu with L fixed: psi_1(L) + psi_1(nu) = k2.

    L is the image's ENL (homogeneous windows); nu small = strong texture. When k2 leaves no
    room for texture (k2 <= psi_1(L) + psi_1(nu_max)) nu is capped at `nu_max`.
    """
    if not (np.isfinite(k2) and np.isfinite(looks) and looks > 0):
        return float("nan")
    rest = k2 - float(polygamma(1, looks))
    if rest <= float(polygamma(1, nu_max)):
        return float(nu_max)
    return float(min(inverse_trigamma(rest), nu_max))


def sar_descriptors(
    amplitude: np.ndarray, enl_window: int | None = None, enl_fraction: float = 0.25
) -> dict[str, float]:
    """Every :data:`DESCRIPTORS` value of one (H, W) amplitude image."""
    a = np.asarray(amplitude, dtype=np.float64)
    looks = enl(a, enl_window, enl_fraction)
    k1, k2, k3 = log_cumulants(a)
    return {
        "mean": float(a.mean()),
        "std": float(a.std()),
        "enl": looks,
        "cv": coefficient_of_variation(a),
        "molc_k1": k1,
        "molc_k2": k2,
        "molc_k3": k3,
        "gamma_looks": gamma_looks_molc(k2),
        "k_nu": k_texture_molc(k2, looks),
    }


# Gap of a descriptor between sets: relative for scale-like quantities, absolute for the
# log-cumulants (already logarithmic, and k1/k3 can be ~0 so a ratio would explode).
_RELATIVE_GAP = {"mean", "std", "enl", "cv", "gamma_looks", "k_nu"}


def descriptor_gaps(reference: dict[str, np.ndarray], generated: dict[str, np.ndarray]) -> dict[str, float]:
    """``{<descriptor>_gap}``: |mean_gen - mean_ref| (/ |mean_ref| for scale-like descriptors).

    Means ignore nan (an image without a usable window); a gap is nan if either set has none.
    """
    out = {}
    for name in DESCRIPTORS:
        r = np.asarray(reference[name], dtype=np.float64)
        g = np.asarray(generated[name], dtype=np.float64)
        r, g = r[np.isfinite(r)], g[np.isfinite(g)]
        if r.size == 0 or g.size == 0:
            out[f"{name}_gap"] = float("nan")
            continue
        gap = abs(g.mean() - r.mean())
        if name in _RELATIVE_GAP:
            gap = gap / abs(r.mean()) if r.mean() != 0 else (0.0 if gap == 0 else float("inf"))
        out[f"{name}_gap"] = float(gap)
    return out


# ------------------------------------------------------------------------------- set level


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Frechet distance of two Gaussians: |mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2)).

    tr((C1 C2)^(1/2)) is computed as the nuclear norm (sum of singular values) of
    C1^(1/2) C2^(1/2): real, stable for the singular covariances of small sets, and free of
    the square roots of ~0 eigenvalues that leave ~1e-8 where the distance is exactly 0.
    Symmetric, and 0 for equal inputs.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    c1, c2 = np.atleast_2d(cov1).astype(np.float64), np.atleast_2d(cov2).astype(np.float64)

    def sqrtm_psd(c: np.ndarray) -> np.ndarray:
        w, v = np.linalg.eigh((c + c.T) / 2)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    tr_sqrt = np.linalg.svd(sqrtm_psd(c1) @ sqrtm_psd(c2), compute_uv=False).sum()
    d = float(np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * tr_sqrt)
    # Rounding can leave ~1e-15 * scale of either sign where the true value is 0.
    scale = max(np.trace(c1) + np.trace(c2), 1e-300)
    return 0.0 if abs(d) < 1e-10 * scale else max(d, 0.0)
