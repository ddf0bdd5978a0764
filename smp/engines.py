"""Stage 12: entry points whose work an engine may spread past this process, above the engines they choose
between. ``embed``: ``engine=local`` is ``smp.embed.run_embed``; ``engine=spark`` has Spark executors fill the
feature cache (``smp.spark.embed_spark``: the same cache layout and keys), then the local job finds every image
there and logs the features table and the executors' counts. (``predict`` chooses its engine itself:
``smp.predict.run_predict``.)
"""

from __future__ import annotations

import logging
from dataclasses import replace

from smp import embed
from smp.embed import EmbedJob
from smp.jobs import Job
from smp.tracking import JobResult

log = logging.getLogger("smp.engines")


def run_embed(cfg: EmbedJob = EmbedJob(), parent=None) -> JobResult:
    """The ``embed`` entry point on ``cfg.engine``."""
    if cfg.engine != "spark":
        return embed.run_embed(cfg, parent)
    from smp.clip import load_clip
    from smp.spark import embed_spark

    embed_cfg = cfg.embed
    try:  # the weights are checked on the driver first: an executor must not be the first to find them missing
        load_clip(embed_cfg)
    except RuntimeError as exc:
        if str(cfg.source.data) not in ("", "demo"):
            raise
        log.warning("%s -- the built-in demo data falls back to RANDOM CLIP weights (clip_pretrained=none)", exc)
        embed_cfg = replace(embed_cfg, clip_pretrained="none", checkpoint="")
    counts = embed_spark(cfg.source.data, embed_cfg, cfg.spark_master, images=cfg.source.images)
    return embed.run_embed(cfg, parent, spark=counts)


EMBED = Job("embed", embed.EMBED.help, run_embed, EmbedJob)
