"""What each feature group costs: fit on the training posts and transform of new posts, per 1,000 posts.

On ``--n`` synthetic posts (``smp.synth.draw_posts``, data version 2) each group of ``smp.groups`` is fitted
(``fit_transform``: the user group's out-of-fold table, the text group's SVD / PCA) and then transforms 1,000
posts; each is timed ``--repeats`` times and the median is printed, in seconds per 1,000 posts. The CLIP text
encoder (``text_encoder=clip``) is timed on ``--clip-posts`` posts with an empty embedding cache (a fresh
``SMP_CACHE_DIR``) and again with the cache filled, for the tiny CLIP of the tests and for RN50 with random
weights (this machine is offline; the weights do not change the cost). Not a timed test: figures for
docs/benchmarks.md.

Run:  .venv/bin/python benchmarks/group_cost.py --n 8000 --repeats 3 --clip-posts 300
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8000, help="training posts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clip-posts", type=int, default=300, help="posts the CLIP text encoder is timed on")
    args = parser.parse_args()
    os.environ["SMP_CACHE_DIR"] = tempfile.mkdtemp(prefix="smp-group-cost-")

    from smp.clip import TINY_CLIP
    from smp.groups import FeaturesCfg, GroupSet
    from smp.synth import SynthCfg, draw_posts

    posts = draw_posts(SynthCfg(n=args.n, seed=0))
    y = posts["label"].to_numpy(dtype=float)
    new = draw_posts(SynthCfg(n=1000, seed=1))
    per_k = 1000 / args.n
    print(f"{args.n} training posts; seconds per 1,000 posts (median of {args.repeats})\n")
    print("| group | fit (s / 1,000 training posts) | transform (s / 1,000 posts) | note |")
    print("|---|---|---|---|")
    for name in ("tabular", "time", "user", "text"):
        groups = GroupSet(FeaturesCfg(name))
        fit = timed(lambda: groups.fit_transform(posts, y), args.repeats)
        transform = timed(lambda: groups.transform(new), args.repeats)
        note = ""
        if name == "user":
            note = f"user table: {groups.facts_['features/user_table_users']} users"
        if name == "text":
            note = "hashing encoder (n-grams + SVD to 32)"
        print(f"| {name} | {fit * per_k:.4f} | {transform:.4f} | {note} |")
    sub, sub_new = posts.iloc[:args.clip_posts].reset_index(drop=True), new.iloc[:args.clip_posts]
    per_clip = 1000 / args.clip_posts
    for model in (TINY_CLIP, "RN50"):
        cfg = FeaturesCfg("text", text_encoder="clip", clip_model=model, clip_pretrained="none")
        groups = GroupSet(cfg)
        t0 = time.perf_counter()
        groups.fit_transform(sub, y[:args.clip_posts])  # model load + every text encoded
        cold = time.perf_counter() - t0
        warm = timed(lambda: groups.fit_transform(sub, y[:args.clip_posts]), args.repeats)  # all from the cache
        t0 = time.perf_counter()
        groups.transform(sub_new)  # new texts: encoded (the model is loaded)
        encode = time.perf_counter() - t0
        print(f"| text, clip {model} | {cold * per_clip:.2f} cold (load + encode), {warm * per_clip:.3f} cached | "
              f"{encode * per_clip:.2f} new texts | {args.clip_posts} posts timed |")


if __name__ == "__main__":
    main()
