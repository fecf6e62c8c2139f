"""SAR-CLIP: image embeddings from a SAR-tuned CLIP (needs ``eval.clip``), prompt alignment
of the generated images and embedding-distribution distances to the reference.

torch / open_clip load only when this family runs (``sar_ray.metrics.clip`` is imported
inside the functions), so CLIP-free evaluations never import torch.
"""

from __future__ import annotations

import numpy as np

from sar_ray.metrics.families import Aggregate, Context, Family, SetView

# KID averages `kid_subsets` random subsets; inside the bootstrap each resample already
# redraws the images, so a few subsets per resample keep the interval's cost near the point's.
_RESAMPLE_KID_SUBSETS = 10


def _resample_distances(ref: np.ndarray, gen: np.ndarray, subset_size: int, subsets: int, seed: int) -> dict:
    """FD and KID as torchmetrics defines them (Frechet distance of Gaussians; unbiased MMD^2
    with the cubic polynomial kernel over random subsets), in numpy: building the torchmetrics
    modules once per bootstrap resample cost minutes for a 12-image set."""
    from sar_ray.metrics.statistics import frechet_distance

    if len(ref) < 2 or len(gen) < 2:
        return {"fd": float("nan"), "kid": float("nan")}
    fd = frechet_distance(ref.mean(0), np.cov(ref, rowvar=False), gen.mean(0), np.cov(gen, rowvar=False))
    m = int(min(subset_size, len(ref), len(gen)))
    rng = np.random.default_rng(seed)
    dim = ref.shape[1]
    kernel = lambda x, y: (x @ y.T / dim + 1.0) ** 3  # noqa: E731 - torchmetrics' poly_kernel defaults
    vals = []
    for _ in range(subsets):
        x, y = ref[rng.choice(len(ref), m, replace=False)], gen[rng.choice(len(gen), m, replace=False)]
        kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
        off = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        vals.append(off - 2 * kxy.mean())
    return {"fd": float(max(fd, 0.0)), "kid": float(max(np.mean(vals), 0.0))}


def load(cfg, device: str):
    from sar_ray.metrics.clip import load_clip

    return load_clip(cfg.clip, device=device)


def describe(images: np.ndarray, cfg, model=None) -> dict[str, np.ndarray]:
    return {"embedding": model.encode_images(images)}  # (N, D) unit vectors


def aggregate(gen: SetView, ref: SetView, cfg, ctx: Context) -> Aggregate:
    from sar_ray.metrics import clip as clip_metrics

    prompts = [str(t or "") for t in gen.text]
    g_emb, r_emb = gen.columns["embedding"], ref.columns["embedding"]
    if not all(p.strip() for p in prompts):
        # Images without prompts (a real held-out set scored as a sweep's anchor; `evaluate`
        # refuses them otherwise): the image distances only, no prompt alignment.
        return _distances(Aggregate({}, warnings=[] if ctx.resample else [
            f"clip/score and clip/retrieval_top1 not computed: {sum(not p.strip() for p in prompts)} of "
            f"{len(prompts)} generated images have no prompt; clip/fd and clip/kid compare images only"]),
            r_emb, g_emb, cfg, ctx)
    distinct = sorted(set(prompts))
    key = ("clip/prompts", tuple(distinct))
    if key not in ctx.cache:
        ctx.cache[key] = ctx.model.encode_texts(distinct)  # (T, D)
    p_emb = ctx.cache[key]
    index = np.array([distinct.index(p) for p in prompts])
    per = clip_metrics.clip_scores(g_emb, p_emb[index])
    hits = clip_metrics.retrieval_hits(g_emb, p_emb, index)
    agg = Aggregate({"clip/score": float(per.mean())})
    agg.metrics["clip/retrieval_top1"] = float(hits.mean()) if len(distinct) >= 2 else float("nan")
    if ctx.resample:
        return _distances(agg, r_emb, g_emb, cfg, ctx)
    if len(distinct) < 2:
        agg.warnings.append("clip/retrieval_top1 needs >= 2 distinct prompts: nan")
    agg = _distances(agg, r_emb, g_emb, cfg, ctx)
    agg.summary["clip"] = {**agg.summary["clip"], "prompts": len(distinct), "retrieval_chance": 1.0 / len(distinct)}
    agg.per_image = {"generated": {"clip_score": per.astype(np.float64), "clip_retrieval_hit": hits.astype(bool)}}
    return agg


def _distances(agg: Aggregate, r_emb, g_emb, cfg, ctx: Context) -> Aggregate:
    """`agg` with clip/fd and clip/kid of the two embedding sets (numpy inside the bootstrap,
    torchmetrics' definition either way)."""
    from sar_ray.metrics import clip as clip_metrics

    if ctx.resample:
        subsets = min(cfg.kid_subsets, _RESAMPLE_KID_SUBSETS)
        d = _resample_distances(np.asarray(r_emb, np.float64), np.asarray(g_emb, np.float64), cfg.kid_subset_size,
                                subsets, cfg.seed)
        agg.metrics["clip/fd"], agg.metrics["clip/kid"] = d["fd"], d["kid"]
        return agg
    d = clip_metrics.embedding_distances(r_emb, g_emb, cfg.kid_subset_size, cfg.kid_subsets, cfg.seed)
    agg.metrics["clip/fd"], agg.metrics["clip/kid"] = d["fd"], d["kid"]
    agg.summary["clip"] = {"kid_raw": d["kid_raw"], "kid_std": d["kid_std"]}
    return agg


FAMILY = Family(
    name="clip",
    describe=describe,
    aggregate=aggregate,
    load=load,
    directions={
        "clip/score": "max",  # mean 100 * max(cos(image, its prompt), 0)
        "clip/retrieval_top1": "max",  # own prompt is the closest of the distinct prompts
        "clip/fd": "min",  # Frechet distance of SAR-CLIP image embeddings
        "clip/kid": "min",  # kernel inception distance of SAR-CLIP embeddings, max(KID, 0)
    },
    columns=[("SAR-CLIP score", "clip/score"), ("SAR-CLIP top-1", "clip/retrieval_top1"), ("SAR-CLIP FD", "clip/fd")],
)
