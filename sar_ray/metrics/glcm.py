"""Grey-level co-occurrence (GLCM) texture descriptors, vectorised, equal to scikit-image.

    q = quantize(images01, levels=64)                      # (N, H, W) uint16 in [0, 64)
    props = glcm_props(q, 64, distances=[1, 2, 4], angles=[0, 45, 90, 135])
    props.shape                                             # (N, 7, 3, 4): GLCM_PROPS x d x angle

`glcm_props` returns, for the same quantised input, what ``skimage.feature.graycomatrix`` +
``graycoprops`` return (to ~1e-12; :func:`glcm_props_skimage` is that per-image reference
loop, kept for tests and the benchmark). How it is fast: one ``np.bincount`` per offset counts
every pair of a batch of images at once, and nothing else walks over the count tables more
than twice:

- symmetric GLCMs are counted as *unordered* pairs U[min, max] (half the work of P + P^T),
  in a table laid out by |i - j| (:func:`_pair_bins`; packed to L (L + 1) / 2 bins at many
  levels, so that the bincount, and the scans after it, touch half the memory);
- contrast, dissimilarity and homogeneity depend on i - j only: they come from the sums of
  U's |i - j| blocks (one ``np.add.reduceat``);
- correlation needs only the means, second moments and sum of i*j of the pairs, which are
  sums over image rectangles (from row and column sums) and sum((i - j)^2);
- ASM and entropy are sums over the counts of c^2 and c*log(c): one gather from a complex
  lookup table c*log(c) + 1j*c^2 gives both.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np

GLCM_PROPS = ("contrast", "dissimilarity", "homogeneity", "energy", "ASM", "correlation", "entropy")

# Bins of one bincount call; keeps the count table in L2 cache (a batch of images at 256
# levels is done one image at a time).
_MAX_BINS = 1 << 17
_MAX_PIXELS = 1 << 16


def quantize(images: np.ndarray, levels: int) -> np.ndarray:
    """[0, 1] images -> integer grey levels floor(x * levels) in [0, levels) as uint16."""
    if not 2 <= levels <= 256:
        raise ValueError(f"levels must be in [2, 256] (got {levels})")
    x = np.asarray(images, dtype=np.float64)
    return np.clip(np.floor(x * levels), 0, levels - 1).astype(np.uint16)


def _c_round(x: float) -> int:
    # skimage's Cython loop rounds with C's round(): half away from zero (not banker's).
    return int(math.copysign(math.floor(abs(x) + 0.5), x))


def glcm_offsets(distances: Sequence[float], angles: Sequence[float]) -> list[tuple[int, int]]:
    """(row, col) offset of every (distance, angle) pair, distance-major; angles in degrees.

    Same convention as skimage: row offset round(sin(a) * d), column offset round(cos(a) * d).
    """
    return [
        (_c_round(math.sin(math.radians(a)) * d), _c_round(math.cos(math.radians(a)) * d))
        for d in distances
        for a in angles
    ]


@functools.lru_cache(maxsize=64)
def _offsets(distances: tuple, angles: tuple) -> list[tuple[int, int]]:
    return glcm_offsets(distances, angles)


@functools.lru_cache(maxsize=8)
def _xlogx_table(n: int) -> np.ndarray:
    v = np.arange(n + 1, dtype=np.float64)
    return v * np.log(np.maximum(v, 1.0))


# Above this many levels the unordered-pair table is packed (see _pair_bins): the table work
# it halves outweighs the 4 extra uint16 passes that computing the packed bin costs.
_PACK_LEVELS = 128


def _pair_bins(levels: int) -> tuple[bool, np.ndarray, int]:
    """Layout of the unordered-pair count table U: (packed, starts, size).

    The pairs with |i - j| = t, lo = min(i, j) are the contiguous block starts[t] + lo, lo in
    [0, L - t). Dense: starts[t] = t L (L x L bins, the tail of each block unused); packed:
    blocks back to back in decreasing t, starts[t] = u (u + 1) / 2 with u = L - 1 - t
    (L (L + 1) / 2 bins; the diagonal, t = 0, is the last block).
    """
    L = levels
    t = np.arange(L, dtype=np.intp)
    packed = L > _PACK_LEVELS
    u = L - 1 - t
    starts = u * (u + 1) // 2 if packed else t * L
    return packed, starts, L * (L + 1) // 2 if packed else L * L


@functools.lru_cache(maxsize=8)
def _xlogx_sq_table(n: int) -> np.ndarray:
    v = np.arange(n + 1, dtype=np.float64)
    return v * np.log(np.maximum(v, 1.0)) + 1j * (v * v)


class _RectSums:
    """Sums of x over the image rectangles that the pairs of each offset cover, all at once.

    An offset (dr, dc) drops |dr| rows and |dc| columns at one side, so a rectangle's sum is
    total - dropped rows - dropped columns + the dropped corner block: prefix sums of the row
    and column sums, plus small integral images of the four m x m corners (m = longest
    offset). Two cheap passes over the images, no Python loop over offsets.
    """

    def __init__(self, x: np.ndarray, m: int):
        n, h, w = x.shape
        self.h, self.w = h, w
        rows, cols = x.sum(axis=2, dtype=np.int64), x.sum(axis=1, dtype=np.int64)
        self.total = rows.sum(axis=1)[:, None]
        self.row_pre = np.concatenate([np.zeros((n, 1), np.int64), np.cumsum(rows, axis=1)], axis=1)
        self.col_pre = np.concatenate([np.zeros((n, 1), np.int64), np.cumsum(cols, axis=1)], axis=1)
        mr, mc = min(m, h), min(m, w)

        def corner(block: np.ndarray) -> np.ndarray:  # (N, mr+1, mc+1) integral, zero-padded
            out = np.zeros((n, mr + 1, mc + 1), np.int64)
            out[:, 1:, 1:] = block.astype(np.int64).cumsum(axis=1).cumsum(axis=2)
            return out

        # Flipped so that index k always means "the k rows/columns nearest that edge".
        self.tl = corner(x[:, :mr, :mc])
        self.tr = corner(x[:, :mr, w - mc :][:, :, ::-1])
        self.bl = corner(x[:, h - mr :, :mc][:, ::-1, :])
        self.br = corner(x[:, h - mr :, w - mc :][:, ::-1, ::-1])

    def __call__(self, top: np.ndarray, bottom: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        """(N, K) sums over x[:, top:H-bottom, left:W-right] for each of K rectangles."""
        h, w = self.h, self.w
        s = self.total - self.row_pre[:, top] - (self.row_pre[:, h][:, None] - self.row_pre[:, h - bottom])
        s = s - self.col_pre[:, left] - (self.col_pre[:, w][:, None] - self.col_pre[:, w - right])
        return s + self.tl[:, top, left] + self.tr[:, top, right] + self.bl[:, bottom, left] + self.br[:, bottom, right]


def glcm_props(
    q: np.ndarray,
    levels: int,
    distances: Sequence[float] = (1, 2, 4),
    angles: Sequence[float] = (0.0, 45.0, 90.0, 135.0),
    symmetric: bool = True,
) -> np.ndarray:
    """GLCM properties of quantised images: (N, len(GLCM_PROPS), len(distances), len(angles)).

    `q`: (H, W) or (N, H, W) integers in [0, levels) (see :func:`quantize`); images of one
    call share a shape. Equals ``graycoprops(graycomatrix(q[n], distances, radians(angles),
    levels, symmetric=symmetric), prop)`` for every prop in :data:`GLCM_PROPS`.
    """
    q = np.asarray(q)
    if q.ndim == 2:
        q = q[None]
    if q.ndim != 3:
        raise ValueError(f"expected (H, W) or (N, H, W) grey levels, got shape {q.shape}")
    if not 2 <= levels <= 256:
        raise ValueError(f"levels must be in [2, 256] (got {levels})")
    if q.size and (q.min() < 0 or q.max() >= levels):
        raise ValueError(f"grey levels must be in [0, {levels}) (got {q.min()}..{q.max()})")
    # Chunks small enough that the pair indices (~8 bytes per pixel) and the count table stay
    # in cache: a 256 x 256 image is done alone, 32 x 32 ones 64 at a time.
    chunk = max(1, min(_MAX_BINS // (levels * levels + levels), _MAX_PIXELS // max(q[0].size, 1)))
    out = [
        _glcm_props_chunk(q[i : i + chunk].astype(np.uint16), levels, distances, angles, symmetric)
        for i in range(0, len(q), chunk)
    ]
    return np.concatenate(out) if out else np.zeros((0, len(GLCM_PROPS), len(distances), len(angles)))


def _glcm_props_chunk(q, levels, distances, angles, symmetric) -> np.ndarray:
    n_img, h, w = q.shape
    L = levels
    offsets = _offsets(tuple(distances), tuple(angles))
    k_off = len(offsets)
    if symmetric:
        packed, starts, table = _pair_bins(L)
    else:
        table = L * L
    base = (np.arange(n_img, dtype=np.intp) * table)[:, None, None]
    # Rectangles covered by the first and second pixel of each offset's pairs: the offset
    # drops max(0, -dr) rows at the top and max(0, dr) at the bottom (columns likewise).
    drs = np.array([o[0] for o in offsets])
    dcs = np.array([o[1] for o in offsets])
    m = int(np.abs(np.concatenate([drs, dcs, [0]])).max())
    top, bottom = np.clip(-drs, 0, h), np.clip(drs, 0, h)
    left, right = np.clip(-dcs, 0, w), np.clip(dcs, 0, w)
    q32 = q.astype(np.uint32)
    sums = _RectSums(np.concatenate([q32, q32 * q32]), m)  # x and x^2 in one go
    valid = (top + bottom < h) & (left + right < w)
    t_, b_, l_, r_ = (np.where(valid, v, 0) for v in (top, bottom, left, right))
    s_a, s_a2 = np.split(sums(t_, b_, l_, r_), 2)
    s_b, s_b2 = np.split(sums(b_, t_, r_, l_), 2)  # the neighbour: mirrored
    xlogx = _xlogx_table(2 * h * w + 1)
    xlogx_sq = _xlogx_sq_table(h * w)

    pairs = np.zeros(k_off)  # pairs per image for this offset
    diff_hist = np.zeros((n_img, k_off, L), np.int64)  # pairs with |i - j| = t
    sum_sq = np.zeros((n_img, k_off))  # sum of squared GLCM counts
    sum_xlogx = np.zeros((n_img, k_off))  # sum of c * log(c) over GLCM counts
    fbuf = np.empty((n_img, table), np.complex128)  # reused: xlogx_sq of every bin
    diags = np.zeros((n_img, k_off, L), np.int64)  # U's diagonal (pairs of equal levels)

    for k, (dr, dc) in enumerate(offsets):
        r0, r1 = max(0, -dr), min(h, h - dr)
        c0, c1 = max(0, -dc), min(w, w - dc)
        if r1 <= r0 or c1 <= c0:
            continue  # offset larger than the image: no pairs (skimage: an all-zero GLCM)
        pairs[k] = (r1 - r0) * (c1 - c0)
        a = q[:, r0:r1, c0:c1]  # (N, h', w') reference pixels
        b = q[:, r0 + dr : r1 + dr, c0 + dc : c1 + dc]  # their neighbours at the offset

        # In place on uint16 (< 65536 bins per image), then one cast: a fresh array per
        # operation costs more than the arithmetic (page faults).
        if symmetric:
            # Bin starts[t] + lo of the unordered pair (see _pair_bins), t = |i - j|.
            lo = np.minimum(a, b)
            if packed:  # u (u + 1) / 2 + lo, u = L - 1 - t = L - 1 - hi + lo (< 2^16: no wrap)
                u = np.maximum(a, b)
                np.subtract(np.uint16(L - 1), u, out=u)
                u += lo
                idx = u + np.uint16(1)
                idx *= u
                idx >>= 1
            else:  # t L + lo
                idx = np.maximum(a, b)
                idx -= lo
                idx *= np.uint16(L)
            idx += lo
        else:
            idx = a * np.uint16(L)
            idx += b
        idx = idx.astype(np.intp)  # bincount on intp is ~3x faster than on uint16
        if n_img > 1:
            idx += base
        counts = np.bincount(idx.ravel(), minlength=n_img * table).reshape(n_img, table)
        if symmetric:
            if packed:  # blocks in decreasing t
                diff_hist[:, k, ::-1] = np.add.reduceat(counts, starts[::-1], axis=1)
            else:
                diff_hist[:, k] = np.add.reduceat(counts, starts, axis=1)
            diags[:, k] = counts[:, starts[0] : starts[0] + L]  # block t = 0
        else:
            d = np.abs(a.astype(np.intp) - b) + (np.arange(n_img, dtype=np.intp) * L)[:, None, None]
            diff_hist[:, k] = np.bincount(d.ravel(), minlength=n_img * L).reshape(n_img, L)
        # One gather for both sums: c log c + i c^2 (c^2 and its sums are exact in float64).
        both = np.take(xlogx_sq, counts, out=fbuf, mode="clip").sum(axis=1)
        sum_xlogx[:, k], sum_sq[:, k] = both.real, both.imag

    if symmetric:
        # S = U + U^T off the diagonal and 2 U on it, so with D = diag(U):
        # sum S^2 = 2 sum U^2 + 2 sum D^2,  sum S log S = 2 sum U log U - 2 sum D log D + sum 2D log 2D.
        sum_sq = 2 * sum_sq + 2 * np.einsum("nkl,nkl->nk", diags, diags)
        sum_xlogx = 2 * sum_xlogx - 2 * np.take(xlogx, diags).sum(axis=2) + np.take(xlogx, 2 * diags).sum(axis=2)
    return _props_from_sums(pairs, s_a, s_b, s_a2, s_b2, diff_hist, sum_sq, sum_xlogx, symmetric).reshape(
        n_img, len(GLCM_PROPS), len(distances), len(angles)
    )


def _props_from_sums(pairs, s_a, s_b, s_a2, s_b2, diff_hist, sum_sq, sum_xlogx, symmetric) -> np.ndarray:
    t = np.arange(diff_hist.shape[-1], dtype=np.int64)
    n = np.broadcast_to(pairs, s_a.shape)
    has = n > 0
    safe_n = np.where(has, n, 1.0)
    sum_d2 = (diff_hist @ (t * t)).astype(np.float64)  # exact integer sums
    contrast = sum_d2 / safe_n
    dissimilarity = (diff_hist @ t).astype(np.float64) / safe_n
    homogeneity = (diff_hist @ (1.0 / (1.0 + t * t))) / safe_n
    sum_ab = (s_a2 + s_b2 - sum_d2) / 2  # sum over pairs of i * j, from (i - j)^2
    if symmetric:
        total = 2 * safe_n  # every pair counted as (i, j) and (j, i)
        mean_i = mean_j = (s_a + s_b) / total
        var_i = var_j = (s_a2 + s_b2) / total - mean_i * mean_i
    else:
        total = safe_n
        mean_i, mean_j = s_a / total, s_b / total
        var_i, var_j = s_a2 / total - mean_i**2, s_b2 / total - mean_j**2
    cov = sum_ab / safe_n - mean_i * mean_j
    std_i, std_j = np.sqrt(np.maximum(var_i, 0)), np.sqrt(np.maximum(var_j, 0))
    flat = (std_i < 1e-15) | (std_j < 1e-15)  # skimage: correlation of a flat GLCM is 1
    correlation = np.where(flat, 1.0, cov / np.where(flat, 1.0, std_i * std_j))
    asm = sum_sq / (total * total)
    entropy = np.log(total) - sum_xlogx / total
    props = {
        "contrast": contrast,
        "dissimilarity": dissimilarity,
        "homogeneity": homogeneity,
        "energy": np.sqrt(asm),
        "ASM": asm,
        "correlation": correlation,
        "entropy": entropy,
    }
    out = np.stack([np.where(has, props[p], 1.0 if p == "correlation" else 0.0) for p in GLCM_PROPS], axis=1)
    return out  # (N, P, K) with K distance-major, as glcm_offsets


def glcm_props_skimage(
    q: np.ndarray,
    levels: int,
    distances: Sequence[float] = (1, 2, 4),
    angles: Sequence[float] = (0.0, 45.0, 90.0, 135.0),
    symmetric: bool = True,
) -> np.ndarray:
    """The reference: a per-image loop over skimage's graycomatrix + graycoprops (slow)."""
    from skimage.feature import graycomatrix, graycoprops

    q = np.asarray(q)
    if q.ndim == 2:
        q = q[None]
    out = np.empty((len(q), len(GLCM_PROPS), len(distances), len(angles)))
    for i, img in enumerate(q):
        glcm = graycomatrix(
            img, distances, np.radians(angles), levels=levels, symmetric=symmetric, normed=True
        )
        for j, prop in enumerate(GLCM_PROPS):
            out[i, j] = graycoprops(glcm, prop)
    return out


# ------------------------------------------------------------------------------- descriptors


def descriptor_names(distances: Sequence[float]) -> list[str]:
    """Names of :func:`glcm_descriptors` columns: ``<prop>_d<distance>``."""
    return [f"{p}_d{d:g}" for p in GLCM_PROPS for d in distances]


def glcm_descriptors(
    images: np.ndarray,
    levels: int = 64,
    distances: Sequence[float] = (1, 2, 4),
    angles: Sequence[float] = (0.0, 45.0, 90.0, 135.0),
    symmetric: bool = True,
) -> np.ndarray:
    """(N, len(GLCM_PROPS) * len(distances)) texture descriptors of [0, 1] images.

    Each property is averaged over the angles (rotation-invariant texture, as is usual for
    SAR) and kept per distance; columns are named by :func:`descriptor_names`.
    """
    props = glcm_props(quantize(images, levels), levels, distances, angles, symmetric)
    return props.mean(axis=3).reshape(len(props), -1)


# ------------------------------------------------------------------------------- set level


def set_distances(reference: np.ndarray, generated: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """Distances between two sets of descriptor rows ((N, F) and (M, F), columns `names`).

    - ``rel_mean_diff[/<prop>]``: |mu_g - mu_r| / ((|mu_g| + |mu_r|) / 2) per descriptor (in
      [0, 2], symmetric; 0 when both means are 0), averaged over all descriptors or over one
      property's distances;
    - ``wasserstein[/<prop>]``: 1-D Wasserstein distance of each descriptor's values, in units
      of the reference's standard deviation, averaged likewise;
    - ``frechet``: Frechet distance of the descriptor vectors after z-scoring both sets with the
      reference's mean and std (so contrast in the hundreds does not drown ASM near 1e-3).
      Needs >= 2 images per set (nan otherwise).
    """
    from sar_ray.metrics.statistics import frechet_distance

    ref, gen = np.asarray(reference, np.float64), np.asarray(generated, np.float64)
    if ref.ndim != 2 or gen.ndim != 2 or ref.shape[1] != gen.shape[1] or ref.shape[1] != len(names):
        raise ValueError(f"expected (N, {len(names)}) and (M, {len(names)}) descriptors, got {ref.shape} and {gen.shape}")
    if len(ref) == 0 or len(gen) == 0:
        raise ValueError("both sets need at least one image")
    mu_r, mu_g = ref.mean(axis=0), gen.mean(axis=0)
    denom = (np.abs(mu_r) + np.abs(mu_g)) / 2
    rmd = np.where(denom > 0, np.abs(mu_g - mu_r) / np.where(denom > 0, denom, 1.0), 0.0)
    sd = ref.std(axis=0, ddof=1) if len(ref) > 1 else np.zeros(ref.shape[1])
    # A descriptor constant over the reference (e.g. correlation 1 of flat images): unit scale.
    unit = np.where(sd > 1e-12 * np.maximum(np.abs(mu_r), 1.0), sd, 1.0)
    w1 = _wasserstein_columns(ref, gen) / unit
    out = {"rel_mean_diff": float(rmd.mean()), "wasserstein": float(w1.mean())}
    if len(ref) >= 2 and len(gen) >= 2:
        zr, zg = (ref - mu_r) / unit, (gen - mu_r) / unit
        out["frechet"] = frechet_distance(zr.mean(0), np.cov(zr, rowvar=False), zg.mean(0), np.cov(zg, rowvar=False))
    else:
        out["frechet"] = float("nan")
    props = [n.rsplit("_d", 1)[0] for n in names]
    for p in dict.fromkeys(props):
        cols = [j for j, q in enumerate(props) if q == p]
        out[f"rel_mean_diff/{p}"] = float(rmd[cols].mean())
        out[f"wasserstein/{p}"] = float(w1[cols].mean())
    return out


def _wasserstein_columns(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(F,) 1-D Wasserstein distance of each column of (N, F) `u` and (M, F) `v`: the integral of
    |F_u - F_v| over the pooled sorted values, all columns at once (scipy's
    ``wasserstein_distance`` one column at a time, which the bootstrap would call thousands of
    times). Ties need no care: between equal values the step width is 0."""
    both = np.concatenate([u, v], axis=0)  # (N + M, F)
    order = np.argsort(both, axis=0, kind="stable")
    values = np.take_along_axis(both, order, axis=0)
    from_u = order < len(u)
    cdf_u = np.cumsum(from_u, axis=0)[:-1] / len(u)
    cdf_v = np.cumsum(~from_u, axis=0)[:-1] / len(v)
    return np.sum(np.abs(cdf_u - cdf_v) * np.diff(values, axis=0), axis=0)
