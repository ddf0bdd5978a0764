r"""Deterministic synthetic SMPD 2019 data: the official file layout, JPEGs included.

``generate(out_dir, cfg)`` writes the seven official training files and one
JPEG per post, so the whole pipeline (loaders, image features, CLIP, models)
runs end to end without the real data.  ``demo_data_dir()`` caches one such
dataset on disk.  Everything is drawn from ``numpy.random.default_rng(seed)``
(version 2's topic words from ``default_rng([seed, 2])``): the same seed and
data version give the same bytes.

Posts are listed in chronological order of ``Postdate``, as the official files
are.  Category frequencies, subcategories and their label effects, the
post-date month profile and the (UTC) hour-of-day profile are hardcoded from
the real SMPD 2019 training posts; every post has a Concept, as in the
official ``train_category.json``.

Hidden label function
---------------------
Per user ``u``: ``q_u ~ N(0, 1)`` (latent quality, in no file; only the
user's other posts reveal it), ``ispro_u``, ``photo_count_u``.  Per post:
``Category c``, ``Subcategory s``, ``Concept k`` (the ``j``-th concept listed
for ``s``), ``Postdate`` (weekday ``wd``, 0 = Monday; ``month``; UTC
``hour``), ``tag_count t`` (words in ``Alltags``) and the image latents ``b``
(brightness), ``col`` (colourfulness), ``sh`` (sharpness), each uniform on
[0, 1], and ``cen`` (1 when the shapes sit at the centre, else 0; 40%)::

    label   = clip(round(6.40 + S - mean(S) + eps, 2), 1.0, 16.6),  eps ~ N(0, 1)
    S       = user + time + content + tags + image
    user    = 1.40*q_u + 0.55*(ln(photo_count_u) - 6.8) + 0.40*(ispro_u - 0.2)
    time    = 0.30*([wd >= 5] - 0.29) + 0.35*(cos(2*pi*(month - 4)/12) + 0.16)
              + 0.30*([17 <= hour <= 22] - 0.08)
    content = CATEGORY_EFFECT[c] + SUBCATEGORIES[c][s][1] + CONCEPT_EFFECT[j]
    tags    = 0.90*(ln(1 + t) - 2.75)
    image   = 2.4*(b - 0.5) + 1.9*(col - 0.5) + 2.6*(sh - 0.5) + 0.50*(cen - 0.4)

``mean(S)`` is taken over the drawn posts, so that small draws keep the real
mean.  ``CATEGORY_EFFECT`` and the subcategory effects are the real mean
labels' offsets; ``CONCEPT_EFFECT = (+0.30, +0.10, -0.10, -0.30)`` by the
concept's position in its subcategory's list.  Measured on 50,000 posts:
label mean 6.40, sd 2.46, 1.5% at the floor 1.0; shares of the label variance:
user 0.45, image 0.23, tags 0.09, content 0.08, time 0.01, noise 0.16, of
which text 0.08 in data version 2 (below).  So the best possible RMSE is
about 1.0 (0.73 in version 2, the topic read from the words); without the
image about sqrt(1 + 1.39) = 1.55; without the image and the user's
identity (``q_u``) about 2.1.  ``score_components`` returns the five parts,
``hidden_score`` their sum ``S``.

Text signal (data versions)
---------------------------
``SynthCfg.data_version`` (default 2) picks what titles and tags say.
Version 1 is the original generator, the same bytes for the same seed: its
words carry nothing beyond their counts (``tags`` above).  Version 2 draws
everything version 1 draws, unchanged (every label, every non-text field,
every image, each title's word and character counts, each post's tag count),
and then, from its own stream ``default_rng([seed, 2])``, gives each post a
topic ``z`` in 0..7: the octile of its ``eps`` under ``N(0, 1)`` (0 = lowest),
or with probability ``P_OFF_TOPIC = 0.30`` a topic uniform at random.  Each
title word of 3 or more letters becomes, with probability 0.5, the topic's
word of the same length, and each generic tag (never the post's own concept,
subcategory and category tags), with probability 0.3, one of the topic's six
words (``TOPIC_WORDS``; no topic word occurs anywhere else).  95% of posts
then show at least one topic word.  So ``eps = text + rest`` with
``text = E[eps | z] = 0.7 * (mean of N(0, 1) on octile z)``
(``TOPIC_EFFECT``: -1.15, -0.63, -0.34, -0.11, +0.11, +0.34, +0.63, +1.15) and
``E[rest | z] = 0``; ``text_effect`` returns it per post.  Its share of the
label variance, ``Var(text) / Var(label)`` on the 50,000 posts of
``draw_posts(SynthCfg(n=50_000, seed=0))``, is 0.076 (0.072 from the topic
means of ``label - 6.40 - S + mean(S)``, which the floor clips); the rest of
the noise keeps 0.09.

Images: a two-colour gradient background plus 2-5 shapes (circles,
rectangles, lines) clustered either at the centre (``cen = 1``) or towards a
corner.  ``col`` sets the saturation and the hue spread of the palette
(0: nearly grey), ``sh`` sets a fine texture (high) against a strong Gaussian
blur (low), and ``b`` sets the mean intensity exactly (30 + 190*b on 0-255).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import pathlib
import shutil
import tempfile
from dataclasses import dataclass
from statistics import NormalDist

import cv2
import numpy as np
import pandas as pd

from smp.jobs import Job

DATA_VERSIONS = (1, 2)  # 1: the original draw, no text signal; 2: topic words carry part of the noise
DATA_VERSION = 2  # the default; a new version for any change in what a seed draws, so caches never mix

JPEG_QUALITY = 90  # fixed, so the bytes are reproducible
LABEL_MEAN = 6.40  # label mean before clipping at LABEL_MIN (which lifts it ~0.01)
LABEL_MIN, LABEL_MAX = 1.0, 16.6
NOISE_SD = 1.0
BAD_KINDS = ("empty", "truncated", "not_image", "missing")

# Real SMPD 2019 category shares (243,557 training posts).
CATEGORY_FREQ = {
    "Travel&Active&Sports": 0.2179,
    "Holiday&Celebrations": 0.1791,
    "Fashion": 0.1609,
    "Entertainment": 0.0970,
    "Social&People": 0.0762,
    "Whether&Season": 0.0662,
    "Animal": 0.0657,
    "Food": 0.0547,
    "Urban": 0.0497,
    "Electronics": 0.0184,
    "Family": 0.0140,
}

# Real category mean label minus the overall mean (6.41).
CATEGORY_EFFECT = {
    "Animal": -0.37, "Electronics": -0.53, "Entertainment": -0.22,
    "Family": 0.15, "Fashion": 0.92, "Food": -0.40,
    "Holiday&Celebrations": -0.38, "Social&People": 0.10,
    "Travel&Active&Sports": -0.06, "Urban": -0.21, "Whether&Season": 0.17,
}

# Category -> subcategory -> (real post count, real mean label minus the
# category mean, concepts).  Subcategories with >= 300 real posts; concepts are
# the most frequent real ones (Fashion/Guys and Travel/Health have none in the
# real sample and got two made-up ones).
SUBCATEGORIES = {
    "Animal": {
        "Cats": (1939, -0.64, ("catlover", "kitty", "ilovemycat", "cat")),
        "Dogs": (2012, 0.86, ("doglover", "pup", "lovedogs", "dogsitting")),
        "Fish": (5483, -0.08, ("freshwater", "fishtank", "saltwater", "watertank")),
        "Horses": (3913, 0.15, ("mane", "gallop", "horseshoe", "jockey")),
        "Insects": (2659, -0.25, ("naturelover", "creatures", "lovenature", "earth")),
    },
    "Electronics": {
        "Electronics": (4475, 0.00, ("samsunggalaxy", "gadget", "gadgets", "laptops")),
    },
    "Entertainment": {
        "Books": (8869, 0.08, ("reader", "stories", "imagine", "words")),
        "Movies": (4917, -0.06, ("moviestar", "flick", "dvd", "film")),
        "Music": (8357, -0.08, ("repeat", "remix", "genre", "melody")),
        "Video&Games": (1481, 0.21, ("gamer", "gamergirl", "videogames", "gaming")),
    },
    "Family": {
        "Babies": (3212, 0.14, ("cuddle", "cuddly", "babies", "infant")),
        "Kids": (201, -0.50, ("child", "lovely")),
    },
    "Fashion": {
        "Bracelets": (388, -1.47, ("bracelets", "bracelet")),
        "Earrings": (623, 0.12, ("earring", "gorgeous")),
        "Fashion": (726, 0.08, ("glam",)),
        "Guys": (1348, -0.62, ("menswear", "dapper")),
        "Hair": (5758, -0.28, ("hairstyles", "straight", "hairdo", "braid")),
        "Jewelry": (4415, -0.72, ("jewel", "crystals", "accessory", "bling")),
        "Makeup": (9549, 0.23, ("eyebrows", "glue", "eyeliner", "tar")),
        "Nails": (4202, -0.24, ("sparkles", "opi", "branco", "unhas")),
        "OOTD": (1737, -0.69, ("outfitoftheday", "wiwt", "clothes", "lookbook")),
        "Piercings": (2677, 0.47, ("ear", "navel", "modifications")),
        "Sneakers": (1819, 0.09, ("kicks", "sneakerhead", "solecollector", "shoe")),
        "Tattoos": (5712, 0.84, ("tattooed", "tat", "inked", "bodyart")),
    },
    "Food": {
        "Coffee": (1213, -0.36, ("caffeine", "cafe", "coffee")),
        "Dessert": (5032, -0.21, ("hungry", "desserts", "foods", "foodpics")),
        "Drinks": (4836, 0.00, ("thirsty", "liquor", "beers", "thirst")),
        "Tea": (2159, 0.78, ("teacup", "teatime", "tea")),
    },
    "Holiday&Celebrations": {
        "Birthday": (1058, -1.23, ("old", "candle", "candles", "birthdaycake")),
        "Christmas": (8252, 0.16, ("merrychristmas", "ornaments", "jolly", "xmas")),
        "Halloween": (13049, 0.10, ("scared", "jackolantern", "treat", "hauntedhouse")),
        "New": (5419, -0.43, ("newyearsday", "happynewyear", "newyearseve", "newyears")),
        "Party": (3857, 0.57, ("chilling", "partying", "funtimes", "funtime")),
        "Thanksgiving": (4945, -0.04, ("thankful", "thanks", "giving", "stuffing")),
        "Wedding": (7018, -0.13, ("congratulations", "weddingparty", "weddinggown", "unforgettable")),
    },
    "Social&People": {
        "Friends": (2491, -0.29, ("bestfriends", "bestfriend", "friendship", "awesome")),
        "Good": (10926, -0.06, ("goodnight", "goodmorning", "awake", "moonlight")),
        "Guys": (516, 1.57, ("dude",)),
        "Love": (3004, 0.71, ("kisses", "hugs", "xoxo", "kiss")),
        "Selfies": (1551, -1.00, ("selfies", "igdaily", "portrait", "face")),
    },
    "Travel&Active&Sports": {
        "Baltimore": (1948, -0.29, ("ravens", "baltimoreravens", "nola", "baltimore")),
        "Baseball": (1914, -1.02, ("bases", "mitt", "swing", "bat")),
        "Basketball": (759, -0.64, ("hoop", "court", "nba", "basket")),
        "Bodybuilding": (4716, 0.62, ("ripped", "flex", "squat", "grind")),
        "Cars": (6691, -0.20, ("spoiler", "exoticcars", "exoticcar", "sportscars")),
        "Cheerleading": (3381, 0.88, ("stretch", "scorpion", "tumbling", "cheering")),
        "Dance": (2695, 0.19, ("flexibility", "dancefloor", "studio", "dancerecital")),
        "Denver": (1344, -0.27, ("bronco", "denverbroncos")),
        "Football": (3532, 0.33, ("pads", "footballplayer", "footballgame", "quarterback")),
        "Gymnastics": (3521, 1.04, ("flip", "vault", "beam", "gymnasts")),
        "Health": (1522, 0.34, ("fitness", "healthy")),
        "Hockey": (3769, -0.52, ("icerink", "stanleycup", "hockeyplayer", "shot")),
        "Motorcycles": (3102, -0.22, ("bikelife", "supermoto", "helmet", "rideout")),
        "Running": (819, 1.78, ("trailrunner", "marathon", "trailrun", "runner")),
        "San": (1820, -1.18, ("faithful", "niners", "sanfrancsico")),
        "Seattle": (577, -0.18, ("sea", "seattleseahawks", "hawks")),
        "Skateboarding": (4683, -0.43, ("skatelife", "ollie", "longboard", "longboarding")),
        "Soccer": (1867, 0.63, ("soccerball", "fifa", "soccergame", "team")),
        "Sports": (508, 0.05, ("gametime", "action", "crowd", "win")),
        "Travel": (3903, -0.71, ("travelgram", "visiting", "igtravel", "tourist")),
    },
    "Urban": {
        "Architecture": (5983, -0.26, ("lookingup", "architectureporn", "archilovers", "architexture")),
        "StreetArt": (6126, 0.25, ("stickerart", "stencilart", "pasteup", "sprayart")),
    },
    "Whether&Season": {
        "Cloudy": (1624, -1.19, ("cloudporn", "horizon", "overcast", "skyporn")),
        "Fall": (685, -1.58, ("foliage", "leaf", "autumn", "leaves")),
        "Raining": (3604, 1.02, ("downpour", "raining", "rainyday", "pouring")),
        "Snowing": (2485, -0.54, ("chilly", "snowfall", "frost", "frosty")),
        "Spring": (385, -0.85, ("color", "blossom", "trees", "flower")),
        "Summer": (914, -0.86, ("summertime", "bluesky")),
        "Sunny": (4416, 0.46, ("beautifulday", "skywatcher", "sunrays", "thesun")),
        "Winter": (2021, -0.11, ("wintertime", "holidayseason")),
    },
}
CONCEPT_EFFECT = (0.30, 0.10, -0.10, -0.30)

# Real post counts per month, 2015-03 .. 2016-02 (posts grow over time).
MONTH_WEIGHTS = {
    (2015, 3): 8401, (2015, 4): 6958, (2015, 5): 14076, (2015, 6): 13301,
    (2015, 7): 16119, (2015, 8): 15596, (2015, 9): 19897, (2015, 10): 29545,
    (2015, 11): 22182, (2015, 12): 31620, (2016, 1): 30066, (2016, 2): 35771,
}
# Real share of posts per UTC hour 0..23 (posts with a known exact time).
HOUR_WEIGHTS = (
    0.035, 0.042, 0.048, 0.066, 0.071, 0.070, 0.073, 0.077, 0.068, 0.069, 0.066, 0.051,
    0.047, 0.036, 0.027, 0.027, 0.031, 0.017, 0.014, 0.010, 0.008, 0.011, 0.016, 0.020,
)
# Flickr timezone_id, timezone_offset ("+HH:MM"), and a city for geotags.
TIMEZONES = (
    ("America/New_York", "-05:00", 40.71, -74.01),
    ("America/Los_Angeles", "-08:00", 34.05, -118.24),
    ("America/Chicago", "-06:00", 41.88, -87.63),
    ("Europe/London", "+00:00", 51.51, -0.13),
    ("Europe/Paris", "+01:00", 48.86, 2.35),
    ("Asia/Shanghai", "+08:00", 31.23, 121.47),
    ("Asia/Tokyo", "+09:00", 35.68, 139.69),
    ("Australia/Sydney", "+10:00", -33.87, 151.21),
    ("America/Sao_Paulo", "-03:00", -23.55, -46.63),
    ("Asia/Kolkata", "+05:30", 19.08, 72.88),
)
GENERIC_TAGS = (
    "instagood photooftheday love beautiful happy cute tbt fashion follow me "
    "selfie summer art instadaily friends repost nature girl fun style smile "
    "food instalike family travel likeforlike fitness igers tagsforlikes nofilter "
    "life beauty amazing instamood instagram photo music picoftheday model bestoftheday "
    "sun dog beach sky makeup photography iphone canon nikon sony flickr "
    "color colors light night city street portrait landscape black white bw "
    "blue red green pink gold party weekend holiday trip view sunset sunrise "
    "winter autumn spring snow rain cool awesome design vintage home new"
).split()
TITLE_WORDS = (
    "my the a day new with at in of and first last little big happy old best "
    "time world life light night morning view friends home city summer winter "
    "walk trip game show look love weekend fun"
).split()
# Data version 2: topic k (0 = lowest noise) has one word of each length 3..8, so a title word swapped
# for the topic word of its own length keeps the title's character count (the tabular ``title_len``).
# No topic word is a generic tag, title word, concept, subcategory or category word, so tags stay distinct
# and a topic word always names its topic.
TOPIC_WORDS = (
    ("bus", "desk", "queue", "errand", "laundry", "commuter"),
    ("pen", "memo", "inbox", "office", "meeting", "printout"),
    ("rug", "sofa", "porch", "garage", "kitchen", "backyard"),
    ("pub", "mall", "plaza", "bakery", "station", "sidewalk"),
    ("elm", "pond", "field", "meadow", "orchard", "lakeside"),
    ("fog", "dusk", "amber", "golden", "glowing", "twilight"),
    ("ice", "cove", "fjord", "canyon", "glacier", "panorama"),
    ("ufo", "nova", "comet", "aurora", "eclipse", "milkyway"),
)
P_OFF_TOPIC = 0.30  # share of posts whose topic is uniform at random instead of their noise's octile
P_TOPIC_TITLE = 0.50  # chance that a title word of length 3..8 becomes the topic word of that length
P_TOPIC_TAG = 0.30  # chance that a generic tag becomes a topic tag (own tags always stay)
SYLLABLES = "an bel cor dan el fo gra hel is jo ka lu mar nel or pix ray sol tam vi wen zo".split()

_START_2015 = int(dt.datetime(2015, 1, 1, tzinfo=dt.timezone.utc).timestamp())


def _topic_bins() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(the noise's inner octile cuts, E[noise | topic k]) for ``N(0, NOISE_SD)`` and ``P_OFF_TOPIC``."""
    k = len(TOPIC_WORDS)
    dist = NormalDist(0.0, NOISE_SD)
    cuts = [dist.inv_cdf(j / k) for j in range(1, k)]
    edges = [-np.inf, *cuts, np.inf]
    # Mean of a normal between two cuts, times the chance that the topic came from the noise at all:
    # an off-topic post's topic is independent of its noise and adds nothing.
    means = [k * NOISE_SD**2 * (dist.pdf(a) - dist.pdf(b)) for a, b in zip(edges, edges[1:])]
    return tuple(cuts), tuple((1 - P_OFF_TOPIC) * m for m in means)


TOPIC_CUTS, TOPIC_EFFECT = _topic_bins()


@dataclass(frozen=True)
class SynthCfg:
    """How much synthetic SMPD data to draw and how."""

    n: int = 2000  # posts
    seed: int = 0  # everything is drawn from default_rng(seed)
    n_users: int = 0  # 0 -> max(2, n // 8) users
    img_min: int = 96  # image side range in px (width and height drawn apart)
    img_max: int = 160
    bad_images: int = 0  # posts whose JPEG is broken, cycling through BAD_KINDS
    data_version: int = DATA_VERSION  # 2: title/tag words carry part of the noise; 1: the original draw, byte for byte

    def __post_init__(self) -> None:
        from smp.config import ConfigError, at_least, check, one_of

        check(self, n=at_least(1), seed=at_least(0), n_users=at_least(0), img_min=at_least(8), img_max=at_least(8),
              bad_images=at_least(0), data_version=one_of(*DATA_VERSIONS))
        if self.img_max < self.img_min:
            raise ConfigError(f"img_max={self.img_max}: expected >= img_min={self.img_min}")


# ---------------------------------------------------------------- label ----
def image_score(brightness, colourfulness, sharpness, centred) -> np.ndarray:
    """Return the image part of the hidden score (latents in [0, 1], centred 0/1)."""
    return (2.4 * (np.asarray(brightness) - 0.5) + 1.9 * (np.asarray(colourfulness) - 0.5)
            + 2.6 * (np.asarray(sharpness) - 0.5) + 0.50 * (np.asarray(centred) - 0.4))


def score_components(posts: pd.DataFrame) -> dict[str, np.ndarray]:
    """Return the five parts of the hidden score (see the module docstring).

    ``posts`` needs the columns of ``draw_posts``: ``latent_quality``,
    ``photo_count``, ``ispro``, ``Postdate``, ``Category``, ``Subcategory``,
    ``Concept``, ``tag_count`` and the ``latent_*`` image columns.
    """
    user = (1.40 * posts["latent_quality"].to_numpy()
            + 0.55 * (np.log(posts["photo_count"].to_numpy(float)) - 6.8)
            + 0.40 * (posts["ispro"].to_numpy(float) - 0.2))
    t = pd.DatetimeIndex(pd.to_datetime(posts["Postdate"].to_numpy(np.int64), unit="s"))
    weekend = (t.dayofweek.to_numpy() >= 5).astype(float)
    evening = ((t.hour.to_numpy() >= 17) & (t.hour.to_numpy() <= 22)).astype(float)
    time = (0.30 * (weekend - 0.29) + 0.35 * (np.cos(2 * np.pi * (t.month.to_numpy() - 4) / 12) + 0.16)
            + 0.30 * (evening - 0.08))
    content = np.array([
        CATEGORY_EFFECT[c] + SUBCATEGORIES[c][s][1] + CONCEPT_EFFECT[SUBCATEGORIES[c][s][2].index(k)]
        for c, s, k in zip(posts["Category"], posts["Subcategory"], posts["Concept"])
    ])
    tags = 0.90 * (np.log1p(posts["tag_count"].to_numpy(float)) - 2.75)
    image = image_score(posts["latent_brightness"], posts["latent_colourfulness"],
                        posts["latent_sharpness"], posts["latent_centred"])
    return {"user": user, "time": time, "content": content, "tags": tags, "image": image}


def hidden_score(posts: pd.DataFrame) -> np.ndarray:
    """Return the noiseless hidden score ``S`` (label = clip(6.40 + S - mean(S) + noise))."""
    return sum(score_components(posts).values())


def text_effect(posts: pd.DataFrame) -> np.ndarray:
    """Return the part of each post's noise that its topic explains, ``E[noise | topic]``.

    Reads the hidden ``latent_topic`` column of a data version 2 draw; posts without one (version 1) get 0,
    since their words carry nothing beyond counts.
    """
    if "latent_topic" not in posts.columns:
        return np.zeros(len(posts))
    return np.asarray(TOPIC_EFFECT)[posts["latent_topic"].to_numpy(int)]


# ---------------------------------------------------------------- posts ----
def _user_table(rng: np.random.Generator, n_users: int) -> pd.DataFrame:
    ids = 1_000_000 + rng.choice(159_000_000, size=n_users, replace=False)
    suffix = rng.integers(0, 9, size=n_users)
    ispro = (rng.random(n_users) < 0.2).astype(int)
    log_pc = rng.normal(6.6 + 1.0 * ispro, 1.6)
    firstdate = _START_2015 - (rng.exponential(3.0, n_users) * 365.25 * 86400).astype(np.int64)
    firstdate = np.maximum(firstdate, 1076000000)  # Flickr opened in February 2004
    taken = firstdate - (rng.exponential(1.0, n_users) * 365.25 * 86400).astype(np.int64)
    tz = rng.integers(0, len(TIMEZONES), size=n_users)
    has_alias = rng.random(n_users) < 0.4
    alias_syl = rng.integers(0, len(SYLLABLES), size=(n_users, 3))
    alias_len = rng.integers(2, 4, size=n_users)
    return pd.DataFrame({
        "Uid": [f"{i}@N{s:02d}" for i, s in zip(ids, suffix)],
        "latent_quality": rng.normal(0.0, 1.0, n_users),
        "photo_count": np.clip(np.round(np.exp(log_pc)), 1, 500_000).astype(int),
        "ispro": ispro,
        "canbuypro": np.where(ispro == 1, 0, (rng.random(n_users) < 0.7).astype(int)),
        "photo_firstdate": firstdate,
        "photo_firstdatetaken": taken,
        "tz": tz,
        "Pathalias": ["".join(SYLLABLES[j] for j in syl[:k]) if a else "None"
                      for syl, k, a in zip(alias_syl, alias_len, has_alias)],
        "geo_rate": np.where(rng.random(n_users) < 0.3, 0.9, 0.03),
        "tag_habit": rng.normal(2.75, 0.7, n_users),
    })


def _probs(weights) -> np.ndarray:
    w = np.asarray(list(weights), dtype=float)
    return w / w.sum()


def draw_posts(cfg: SynthCfg = SynthCfg()) -> pd.DataFrame:
    """Draw every post (metadata, latents, label, image spec) without touching disk.

    Returns one row per post in the official (chronological) order, with the
    fields of the official files, the hidden ``latent_*`` columns, ``label``,
    ``img_w``/``img_h``/``img_seed`` and ``image_kind`` (``"ok"`` or one of
    ``BAD_KINDS``).
    """
    if (cfg.n < 1 or not 1 <= cfg.img_min <= cfg.img_max or not 0 <= cfg.bad_images <= cfg.n
            or cfg.data_version not in DATA_VERSIONS):
        raise ValueError(f"bad SynthCfg: {cfg}")
    rng = np.random.default_rng(cfg.seed)
    n = cfg.n
    n_users = cfg.n_users or max(2, n // 8)
    users = _user_table(rng, n_users)

    # Who posts: every user at least once (when possible), then a heavy tail.
    activity = _probs(rng.lognormal(0.0, 1.0, n_users))
    first = np.arange(min(n_users, n))
    who = np.concatenate([first, rng.choice(n_users, size=n - len(first), p=activity)])
    who = who[rng.permutation(n)]
    u = users.iloc[who].reset_index(drop=True)

    # What: real category shares, subcategory shares within the category, concepts uniform.
    cats = list(CATEGORY_FREQ)
    cat_idx = rng.choice(len(cats), size=n, p=_probs(CATEGORY_FREQ.values()))
    category, subcategory, concept = [], [], []
    sub_cdf = {c: np.cumsum(_probs(v[0] for v in subs.values())) for c, subs in SUBCATEGORIES.items()}
    for ci, r1, r2 in zip(cat_idx, rng.random(n), rng.random(n)):
        names = list(SUBCATEGORIES[cats[ci]])
        s = names[min(int(np.searchsorted(sub_cdf[cats[ci]], r1)), len(names) - 1)]
        concepts = SUBCATEGORIES[cats[ci]][s][2]
        category.append(cats[ci])
        subcategory.append(s)
        concept.append(concepts[int(r2 * len(concepts))])

    # When: real month and UTC-hour profiles.
    months = list(MONTH_WEIGHTS)
    m = rng.choice(len(months), size=n, p=_probs(MONTH_WEIGHTS.values()))
    month_start = np.array([int(dt.datetime(y, mo, 1, tzinfo=dt.timezone.utc).timestamp()) for y, mo in months])
    month_days = np.array([(dt.date(y + mo // 12, mo % 12 + 1, 1) - dt.date(y, mo, 1)).days for y, mo in months])
    day = (rng.random(n) * month_days[m]).astype(np.int64)
    hour = rng.choice(24, size=n, p=_probs(HOUR_WEIGHTS))
    postdate = month_start[m] + day * 86400 + hour * 3600 + rng.integers(0, 3600, size=n)

    # Where and how tagged.
    has_geo = rng.random(n) < u["geo_rate"].to_numpy()
    tz = u["tz"].to_numpy()
    lat = np.array([TIMEZONES[i][2] for i in tz]) + rng.normal(0, 0.3, n)
    lon = np.array([TIMEZONES[i][3] for i in tz]) + rng.normal(0, 0.3, n)
    geoacc = np.where(has_geo, rng.integers(1, 17, size=n), 0)
    tag_count = np.clip(rng.poisson(np.exp(u["tag_habit"].to_numpy() + rng.normal(0, 0.5, n))), 0, 75)
    text_draws = _text_draws(rng, n)

    # Assemble; the latent_* columns are in no file, img_* say how to draw the JPEG.
    posts = pd.DataFrame({
        "Uid": u["Uid"],
        "Pid": (rng.choice(max(10 * n, 1000), size=n, replace=False) + 1).astype(str),
        "Category": category, "Subcategory": subcategory, "Concept": concept,
        "Postdate": postdate.astype(np.int64),
        "Latitude": np.where(has_geo, lat, 0.0), "Longitude": np.where(has_geo, lon, 0.0),
        "Geoaccuracy": geoacc,
        "Pathalias": u["Pathalias"],
        "tag_count": tag_count,
        "photo_count": u["photo_count"], "ispro": u["ispro"], "canbuypro": u["canbuypro"],
        "photo_firstdate": u["photo_firstdate"], "photo_firstdatetaken": u["photo_firstdatetaken"],
        "timezone_offset": [TIMEZONES[i][1] for i in tz], "timezone_id": [TIMEZONES[i][0] for i in tz],
        "latent_quality": u["latent_quality"],
        "latent_brightness": rng.random(n),
        "latent_colourfulness": rng.random(n),
        "latent_sharpness": rng.random(n),
        "latent_centred": (rng.random(n) < 0.4).astype(int),
        "img_w": rng.integers(cfg.img_min, cfg.img_max + 1, size=n),
        "img_h": rng.integers(cfg.img_min, cfg.img_max + 1, size=n),
        "img_seed": rng.integers(0, 2**63, size=n),
    })
    noise = rng.normal(0.0, NOISE_SD, n)
    score = hidden_score(posts)
    posts["label"] = np.clip(np.round(LABEL_MEAN + score - score.mean() + noise, 2), LABEL_MIN, LABEL_MAX)
    topics = None
    if cfg.data_version == 2:
        # Its own stream, so that no version 1 draw moves and every non-text field stays as in version 1.
        topics = _topic_draws(np.random.default_rng([cfg.seed, 2]), noise)
        posts["latent_topic"] = topics["topic"]
    posts["Title"], posts["Alltags"] = _texts(text_draws, category, subcategory, concept, tag_count, topics)

    # Official order is chronological; then pick the broken images.
    posts = posts.iloc[np.argsort(posts["Postdate"].to_numpy(), kind="stable")].reset_index(drop=True)
    kind = np.array(["ok"] * n, dtype=object)
    bad = np.sort(rng.choice(n, size=cfg.bad_images, replace=False))
    kind[bad] = [BAD_KINDS[i % len(BAD_KINDS)] for i in range(cfg.bad_images)]
    posts["image_kind"] = kind
    posts["img_path"] = "train/" + posts["Uid"] + "/" + posts["Pid"] + ".jpg"
    return posts


def _text_draws(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """The main stream's draws for titles and tags, taken where version 1 took them."""
    tag_order = np.argsort(rng.random((n, len(GENERIC_TAGS))), axis=1)
    title_words = rng.integers(0, len(TITLE_WORDS), size=(n, 6))
    n_words = rng.integers(0, 7, size=n)
    insert_at, insert_what = rng.random(n), rng.random(n)
    return {"tag_order": tag_order, "title_words": title_words, "n_words": n_words,
            "insert_at": insert_at, "insert_what": insert_what}


def _topic_draws(rng: np.random.Generator, noise: np.ndarray) -> dict[str, np.ndarray]:
    """Per post a topic (the noise's octile, or uniform at random with ``P_OFF_TOPIC``) and which of its
    words swap to that topic's words."""
    n, k = len(noise), len(TOPIC_WORDS)
    off = rng.random(n) < P_OFF_TOPIC
    anywhere = rng.integers(0, k, size=n)
    return {"topic": np.where(off, anywhere, np.searchsorted(TOPIC_CUTS, noise)),
            "swap_title": rng.random((n, 6)) < P_TOPIC_TITLE,
            "swap_tag": rng.random((n, len(GENERIC_TAGS))) < P_TOPIC_TAG,
            "word_order": np.argsort(rng.random((n, len(TOPIC_WORDS[0]))), axis=1)}


def _texts(draws: dict, category, subcategory, concept, tag_count, topics: dict | None = None) -> tuple[list, list]:
    """Return (titles, alltags): per post ``tag_count`` distinct tags, own words first.

    With ``topics`` (version 2) some title words and generic tags become the post's topic words; each title
    keeps its character count and each post its tag count.
    """
    titles, alltags = [], []
    for i, (c, s, k, t) in enumerate(zip(category, subcategory, concept, tag_count)):
        own = list(dict.fromkeys([k, s.lower().replace("&", ""), c.split("&")[0].lower()]))
        generic = [GENERIC_TAGS[j] for j in draws["tag_order"][i] if GENERIC_TAGS[j] not in own]
        words = [TITLE_WORDS[j] for j in draws["title_words"][i, : draws["n_words"][i]]]
        if topics is not None:
            vocab = TOPIC_WORDS[topics["topic"][i]]
            by_length = {len(w): w for w in vocab}
            words = [by_length[len(w)] if swap and len(w) in by_length else w
                     for w, swap in zip(words, topics["swap_title"][i])]
            slots = [j for j in range(max(0, min(t - len(own), len(generic)))) if topics["swap_tag"][i, j]]
            for j, w in zip(slots, (vocab[m] for m in topics["word_order"][i])):  # at most one use of each word
                generic[j] = w
        alltags.append(" ".join((own + generic)[:t]))
        insert_at, insert_what = draws["insert_at"][i], draws["insert_what"][i]
        if words and insert_what < 0.5:
            words.insert(int(insert_at * (len(words) + 1)), s if insert_what < 0.25 else k)
        title = " ".join(words)
        titles.append(title[:1].upper() + title[1:])
    return titles, alltags


# --------------------------------------------------------------- images ----
def _hsv_colours(h, s, v) -> np.ndarray:
    """HSV (h in degrees, s and v in [0, 1]) -> k x 3 BGR floats in [0, 255]."""
    hsv = np.stack([np.asarray(h) % 360 / 2, np.asarray(s) * 255, np.asarray(v) * 255], axis=-1)
    hsv = np.clip(np.round(hsv), 0, [179, 255, 255]).astype(np.uint8)[None]
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0].astype(np.float32)


def render_image(w: int, h: int, brightness: float, colourfulness: float, sharpness: float,
                 centred: int, seed: int) -> np.ndarray:
    """Return an ``h x w x 3`` uint8 BGR image drawn from the post's image latents."""
    rng = np.random.default_rng(seed)
    # Palette: saturation and hue spread grow with colourfulness.
    base_hue = rng.uniform(0, 360)
    k = 2 + int(rng.integers(2, 6))  # two background colours + 2..5 shapes
    hues = base_hue + rng.uniform(-1, 1, k) * 180 * colourfulness
    sats = np.clip(0.03 + 0.9 * colourfulness + rng.normal(0, 0.05, k), 0, 1)
    vals = rng.uniform(0.25, 1.0, k)
    colours = _hsv_colours(hues, sats, vals)

    # Background gradient along a random direction.
    angle = rng.uniform(0, 2 * np.pi)
    gx = np.cos(angle) * np.arange(w, dtype=np.float32) / w
    gy = np.sin(angle) * np.arange(h, dtype=np.float32) / h
    g = gy[:, None, None] + gx[None, :, None]
    g -= g.min()
    g /= max(float(g.max()), 1e-6)
    img = colours[0] + g * (colours[1] - colours[0])

    # Shapes clustered at the centre or towards a corner.
    if centred:
        cx, cy = w * rng.uniform(0.42, 0.58), h * rng.uniform(0.42, 0.58)
    else:
        cx = w * rng.choice([0.2, 0.8]) + rng.normal(0, 0.04 * w)
        cy = h * rng.choice([0.2, 0.8]) + rng.normal(0, 0.04 * h)
    side = min(w, h)
    for colour in colours[2:]:
        x = int(cx + rng.normal(0, 0.08 * w))
        y = int(cy + rng.normal(0, 0.08 * h))
        r = int(side * rng.uniform(0.08, 0.22))
        c = tuple(float(v) for v in colour)
        shape = rng.integers(0, 3)
        if shape == 0:
            cv2.circle(img, (x, y), r, c, -1, lineType=cv2.LINE_AA)
        elif shape == 1:
            cv2.rectangle(img, (x - r, y - r // 2), (x + r, y + r // 2), c, -1)
        else:
            dx, dy = int(r * 1.5 * np.cos(angle + 1)), int(r * 1.5 * np.sin(angle + 1))
            cv2.line(img, (x - dx, y - dy), (x + dx, y + dy), c, max(1, side // 40), lineType=cv2.LINE_AA)

    # Sharp images carry fine texture; blurry ones are strongly smoothed.
    img += np.float32(22 * sharpness) * rng.standard_normal((h, w, 1), dtype=np.float32)
    sigma = 0.04 * side * (1 - sharpness) ** 2
    if sigma > 0.3:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    np.clip(img, 0, 255, out=img)

    # Brightness: blend towards black or white to hit the target mean exactly.
    target, mean = 30 + 190 * brightness, float(img.mean())
    if target < mean:
        img *= np.float32(target / max(mean, 1e-6))
    else:
        img += (255 - img) * np.float32((target - mean) / max(255 - mean, 1e-6))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _image_bytes(post) -> bytes | None:
    """Return the file content for one post's image (None: file not written)."""
    img = render_image(int(post.img_w), int(post.img_h), post.latent_brightness,
                       post.latent_colourfulness, post.latent_sharpness,
                       int(post.latent_centred), int(post.img_seed))
    data = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])[1].tobytes()
    return {"ok": data, "empty": b"", "truncated": data[: int(len(data) * 0.4)],
            "not_image": b"this is not a JPEG image\n", "missing": None}[post.image_kind]


# ---------------------------------------------------------------- files ----
def _dump(path: pathlib.Path, obj) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")


def write_files(posts: pd.DataFrame, out_dir) -> pathlib.Path:
    """Write ``posts`` (from ``draw_posts``) as the official SMPD 2019 layout; return out_dir."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    p = posts
    ids = [{"Uid": a, "Pid": b} for a, b in zip(p["Uid"], p["Pid"])]
    _dump(out / "train_category.json", [
        {**i, "Category": c, "Subcategory": s, "Concept": k}
        for i, c, s, k in zip(ids, p["Category"], p["Subcategory"], p["Concept"])])
    _dump(out / "train_temporalspatial_information.json", [
        {**i, "Postdate": str(d), "Latitude": f"{la:.6f}" if g else "0",
         "Longitude": f"{lo:.6f}" if g else "0", "Geoaccuracy": str(g)}
        for i, d, la, lo, g in zip(ids, p["Postdate"], p["Latitude"], p["Longitude"], p["Geoaccuracy"])])
    _dump(out / "train_additional_information.json", [
        {**i, "Pathalias": a, "Ispublic": 1, "Mediastatus": "ready"} for i, a in zip(ids, p["Pathalias"])])
    _dump(out / "train_text.json", [
        {**i, "Title": t, "Mediatype": "photo", "Alltags": a} for i, t, a in zip(ids, p["Title"], p["Alltags"])])
    taken = [dt.datetime.fromtimestamp(int(s), dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
             for s in p["photo_firstdatetaken"]]
    user_cols = {
        "Uid": p["Uid"].tolist(), "Pid": p["Pid"].tolist(),
        "photo_count": [int(x) for x in p["photo_count"]], "ispro": [int(x) for x in p["ispro"]],
        "canbuypro": [int(x) for x in p["canbuypro"]],
        "photo_firstdate": [str(x) for x in p["photo_firstdate"]], "photo_firstdatetaken": taken,
        "timezone_offset": p["timezone_offset"].tolist(), "timezone_id": p["timezone_id"].tolist(),
    }
    _dump(out / "train_user_data.json", {k: {str(j): v for j, v in enumerate(vals)} for k, vals in user_cols.items()})
    (out / "train_label.txt").write_text("".join(f"{x:.2f}\n" for x in p["label"]))
    (out / "train_img_filepath.txt").write_text("".join(f"{x}\n" for x in p["img_path"]))
    for post in p.itertuples(index=False):
        data = _image_bytes(post)
        if data is not None:
            path = out / post.img_path
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return out


def generate(out_dir, cfg: SynthCfg = SynthCfg()) -> pathlib.Path:
    """Draw a synthetic SMPD dataset and write it into ``out_dir``; return the path.

    Files: ``train_category.json``, ``train_temporalspatial_information.json``,
    ``train_additional_information.json``, ``train_text.json``,
    ``train_user_data.json`` (column-oriented, one entry per post),
    ``train_label.txt``, ``train_img_filepath.txt`` and
    ``train/<Uid>/<Pid>.jpg``.  ``timezone_offset`` is ``"+HH:MM"``;
    ``photo_firstdate`` is Unix seconds, ``photo_firstdatetaken`` is
    ``"YYYY-MM-DD HH:MM:SS"`` (UTC), as the Flickr API gives them.
    """
    return write_files(draw_posts(cfg), out_dir)


def demo_data_dir(n: int = 2000, seed: int = 0, cache_dir=None, data_version: int = DATA_VERSION) -> pathlib.Path:
    """Return the cached demo dataset's folder, generating it on first use.

    The folder is ``<cache_dir>/demo-n{n}-s{seed}-v{data_version}`` (so data versions never share a
    folder, and a version 1 folder from before version 2 existed holds the same bytes), with
    ``cache_dir`` defaulting to ``$SMP_CACHE_DIR`` or ``./.smp_cache``; the
    returned path is absolute.  The data are written into a temporary sibling
    and renamed into place, so an interrupted run never leaves a partial
    dataset under the final name.
    """
    root = pathlib.Path(cache_dir or os.environ.get("SMP_CACHE_DIR") or ".smp_cache").absolute()
    cfg = SynthCfg(n=n, seed=seed, data_version=data_version)  # refuses an unknown version before any disk work
    final = root / f"demo-n{n}-s{seed}-v{data_version}"
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        generate(tmp, cfg)
        os.replace(tmp, final)
    except OSError:
        if not final.is_dir():  # a real failure, not a concurrent run finishing first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


@dataclass(frozen=True)
class SynthJob:
    out: str = "synthetic_smpd"  # output directory (created)
    synth: SynthCfg = SynthCfg()


def run_synth(cfg: SynthJob = SynthJob()) -> JobResult:
    """The `synth` job: write a synthetic SMPD dataset of any size in the official layout."""
    import logging

    from smp.tracking import JobResult

    out = generate(cfg.out, cfg.synth)
    logging.getLogger("smp.synth").info("wrote %d synthetic posts to %s", cfg.synth.n, out)
    if os.environ.get("MLFLOW_RUN_ID"):  # under `mlflow run`: the launcher's run says what it made
        from smp.tracking import name_launched_run

        note = (f"synth: {cfg.synth.n} synthetic SMPD posts (official file layout, JPEGs) written to {out}, "
                f"seed {cfg.synth.seed}, data version {cfg.synth.data_version}; train on them with `data={out}`.")
        name_launched_run(f"synth · n{cfg.synth.n} · s{cfg.synth.seed}",
                          {"smp.job": "synth", "smp.synth_out": str(out), "mlflow.note.content": note})
    return JobResult(os.environ.get("MLFLOW_RUN_ID", ""), {"posts": cfg.synth.n})


SYNTH = Job("synth", "write a synthetic SMPD dataset (official layout, JPEGs)", run_synth, SynthJob)
