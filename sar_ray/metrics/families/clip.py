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


def load(cfg, device: str):
    from sar_ray.metrics.clip import load_clip

    return load_clip(cfg.clip, device=device)


def describe(images: np.ndarray, cfg, model=None) -> dict[str, np.ndarray]:
    return {"embedding": model.encode_images(images)}  # (N, D) unit vectors


def aggregate(gen: SetView, ref: SetView, cfg, ctx: Context) -> Aggregate:
    from sar_ray.metrics import clip as clip_metrics

    prompts = [str(t or "") for t in gen.text]
    distinct = sorted(set(prompts))
    key = ("clip/prompts", tuple(distinct))
    if key not in ctx.cache:
        ctx.cache[key] = ctx.model.encode_texts(distinct)  # (T, D)
    p_emb = ctx.cache[key]
    g_emb, r_emb = gen.columns["embedding"], ref.columns["embedding"]
    index = np.array([distinct.index(p) for p in prompts])
    per = clip_metrics.clip_scores(g_emb, p_emb[index])
    hits = clip_metrics.retrieval_hits(g_emb, p_emb, index)
    agg = Aggregate({"clip/score": float(per.mean())})
    agg.metrics["clip/retrieval_top1"] = float(hits.mean()) if len(distinct) >= 2 else float("nan")
    subsets = min(cfg.kid_subsets, _RESAMPLE_KID_SUBSETS) if ctx.resample else cfg.kid_subsets
    d = clip_metrics.embedding_distances(r_emb, g_emb, cfg.kid_subset_size, subsets, cfg.seed)
    agg.metrics["clip/fd"], agg.metrics["clip/kid"] = d["fd"], d["kid"]
    if ctx.resample:
        return agg
    if len(distinct) < 2:
        agg.warnings.append("clip/retrieval_top1 needs >= 2 distinct prompts: nan")
    agg.summary["clip"] = {
        "prompts": len(distinct), "retrieval_chance": 1.0 / len(distinct),
        "kid_raw": d["kid_raw"], "kid_std": d["kid_std"],
    }
    agg.per_image = {"generated": {"clip_score": per.astype(np.float64), "clip_retrieval_hit": hits.astype(bool)}}
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
