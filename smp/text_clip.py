"""The ``clip`` text encoder: a post's title and tags through the open_clip text tower of the images' CLIP model.

``ClipText`` is the ``text`` group's second encoder, beside ``smp.groups.HashedText`` (same interface): the
text ``"<title> <tag> <tag> ..."`` of each post -> ``encode_text`` -> L2-normalised -> PCA fitted on the
training posts (``dim`` components, ``text_0`` .. ``text_{k-1}``). A post with neither title nor tags gets a
NaN row (missing, not a zero vector).

Inputs are bounded before tokenizing: the group's bounds (``MAX_TITLE_CHARS``, ``MAX_TAG_CHARS``,
``MAX_TAGS``; NUL bytes dropped), then ``MAX_TEXT_CHARS`` of the joined text; the tokenizer keeps its context
(77 tokens for CLIP). A post cut by any of these counts as truncated (``facts_`` at fit, ``last_truncated_``
at transform).

The model is loaded once per process (``_TOWERS``, keyed by what builds it), on the first text to encode, so
texts served from the cache never build it. A fitted ``ClipText`` pickles without it (it travels inside a
logged model) and loads it again when it next has to encode.

Embeddings are cached by text (sha256 of the encoder's identity and the bounded text) in one SQLite file per
encoder identity: ``<root>/features/text/<model>__<weights_id>__<precision>__t<TEXT_VERSION>/embeddings.sqlite``
under the image features' root (``cache_dir``, else ``$SMP_CACHE_DIR``, else ``./.smp_cache``). A row that
does not decode to a finite vector of the model's width is recomputed and replaced; a file SQLite cannot read
is renamed ``*.damaged`` and its texts recomputed; a cache that cannot be written (read-only, locked, full)
only loses its speed-up.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from smp.clip import ClipCfg, load_clip, model_config, model_spec
from smp.data import DataError
from smp.feature_cache import features_root
from smp.post_text import MAX_TAG_CHARS, MAX_TAGS, MAX_TITLE_CHARS
from smp.post_text import bounded_text as _text
from smp.post_text import refuse_missing as _refuse_missing
from smp.image_features import PAPER_CLIP_MODEL, PAPER_CLIP_PRETRAINED

log = logging.getLogger("smp.text_clip")

# The joined text kept before tokenizing: 77 CLIP tokens cover a few hundred characters of words, so what lies
# beyond is cut by the tokenizer anyway, and the BPE never sees a megabyte
MAX_TEXT_CHARS = 1_000
TEXT_VERSION = "1"  # bump when the text built from a post or its bounds change: names the cache folder
# texts encoded between cache writes: an interrupted fit over 300k posts (hours of RN50 on a CPU) keeps its work
WRITE_EVERY = 2_048
_SQL_VARS = 900  # keys per SELECT ... IN (...): under SQLite's oldest limit on bound variables


@dataclass(frozen=True)
class _Tower:
    """A loaded CLIP model's text side: the model, its tokenizer and context, and how it runs."""

    model: torch.nn.Module
    tokenizer: object
    context_length: int
    device: str
    amp: bool  # fp16 autocast (CUDA), as the image encoder runs
    spec: dict  # smp.clip.model_spec of the loaded model


_TOWERS: dict[tuple, _Tower] = {}  # one loaded model per (model, pretrained, checkpoint, device, quick_gelu)
_TOWERS_LOCK = threading.Lock()  # a serving process's threads load it once


def _tower(cfg: ClipCfg) -> _Tower:
    """The process's loaded model for ``cfg``, built on first use."""
    import open_clip

    key = (cfg.clip_model, cfg.clip_pretrained, cfg.checkpoint, cfg.device, cfg.force_quick_gelu)
    with _TOWERS_LOCK:
        if key not in _TOWERS:
            model, _, info = load_clip(cfg)
            tokenizer = open_clip.get_tokenizer(cfg.clip_model)
            context = int(getattr(model, "context_length", None) or model_config(cfg.clip_model)["text_cfg"]
                          .get("context_length", 77))
            _TOWERS[key] = _Tower(model, tokenizer, context, info["device"], info["device"].startswith("cuda"),
                                  info)
        return _TOWERS[key]


def encode_trimmed(model, tokens: torch.Tensor, pad) -> torch.Tensor:
    """``model.encode_text(tokens)``, run on the tokens up to the batch's longest text where that gives the same
    vectors: open_clip's ``CLIP`` with a causal mask pooling at the end-of-text token, whose output there never
    sees the padding after it. Any other text tower runs the full context."""
    import open_clip
    from open_clip.transformer import text_global_pool

    pool = getattr(model, "text_pool_type", None)
    if not isinstance(model, open_clip.CLIP) or getattr(model, "attn_mask", None) is None \
            or pool not in ("argmax", "eos"):
        return model.encode_text(tokens)
    n = int((tokens != pad).sum(dim=1).max())
    tokens = tokens[:, :n]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:n].to(cast)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:n, :n]))
    x = text_global_pool(x, tokens, pool, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is None:
        return x
    return model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) else x @ model.text_projection


def post_texts(posts: pd.DataFrame) -> tuple[list[str], np.ndarray]:
    """Each post's ``"<title> <tag> <tag> ..."`` text, bounded (``""``: no title and no tags), and whether a
    bound cut it (the group's title / tag bounds, then ``MAX_TEXT_CHARS``)."""
    n = len(posts)
    titles = posts["Title"].to_numpy(dtype=object) if "Title" in posts.columns else np.full(n, None)
    tags = posts["Alltags"].to_numpy(dtype=object) if "Alltags" in posts.columns else np.full(n, None)
    texts, cut = [], np.zeros(n, dtype=bool)
    for i, (t, a) in enumerate(zip(titles, tags)):
        title, c1 = _text(t, MAX_TITLE_CHARS)
        alltags, c2 = _text(a, MAX_TAG_CHARS)
        words = alltags.split()
        text = " ".join(title.split() + words[:MAX_TAGS])  # whitespace runs (and dropped NULs) -> one space
        cut[i] = c1 or c2 or len(words) > MAX_TAGS or len(text) > MAX_TEXT_CHARS
        texts.append(text[:MAX_TEXT_CHARS].strip())
    return texts, cut


# --------------------------------------------------------------------------- the cache
def _connect(path: Path, read_only: bool) -> sqlite3.Connection:
    uri = path.absolute().as_uri() + ("?mode=ro" if read_only else "")  # ro: a read-only cache is still read
    return sqlite3.connect(uri, uri=True, timeout=30)


class TextCache:
    """Embeddings by key (sha256 hex) in ``<directory>/embeddings.sqlite``: ``get`` what is there, ``put`` new
    ones; rows ``width`` float32 wide. Never raises for the cache's own faults: it logs and serves less."""

    def __init__(self, directory: Path, width: int):
        self.path, self.width = directory / "embeddings.sqlite", width

    def get(self, keys: list[str]) -> dict[str, tuple[np.ndarray, bool]]:
        """``key -> (embedding, cut by the tokenizer)`` for the keys stored with a usable row."""
        if not keys or not self.path.exists():
            return {}
        found: dict[str, tuple[np.ndarray, bool]] = {}
        try:
            with contextlib.closing(_connect(self.path, read_only=True)) as db:
                for start in range(0, len(keys), _SQL_VARS):
                    part = keys[start:start + _SQL_VARS]
                    rows = db.execute(f"SELECT key, vec, cut FROM emb WHERE key IN ({','.join('?' * len(part))})",
                                      part).fetchall()
                    for key, vec, cut in rows:
                        row = self._row(vec)
                        if row is not None:
                            found[key] = (row, bool(cut))
        except sqlite3.OperationalError as e:  # locked, unreadable, no table yet: serve nothing, keep the file
            log.warning("text embedding cache %s not read (%s); its texts are encoded", self.path, e)
            return {}
        except sqlite3.DatabaseError as e:  # not a database / malformed: set it aside, start a new one
            self._set_aside(e)
            return {}
        return found

    def _row(self, vec) -> np.ndarray | None:
        if not isinstance(vec, bytes) or len(vec) != 4 * self.width:
            return None
        row = np.frombuffer(vec, dtype=np.float32)
        return row if np.isfinite(row).all() else None

    def _set_aside(self, err: Exception) -> None:
        aside = self.path.with_name(self.path.name + ".damaged")
        try:
            os.replace(self.path, aside)
        except OSError:
            log.warning("damaged text embedding cache %s (%s); its texts are encoded", self.path, err)
            return
        log.warning("damaged text embedding cache %s (%s): renamed %s, its texts are encoded", self.path, err,
                    aside.name)

    def put(self, keys: list[str], rows: np.ndarray, cut: np.ndarray) -> None:
        """Store (or replace) rows; a cache that cannot be written is logged and skipped."""
        if not keys:
            return
        data = [(k, np.ascontiguousarray(r, dtype=np.float32).tobytes(), int(c)) for k, r, c in zip(keys, rows, cut)]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.closing(_connect(self.path, read_only=False)) as db, db:
                db.execute("CREATE TABLE IF NOT EXISTS emb (key TEXT PRIMARY KEY, vec BLOB NOT NULL, cut INTEGER)")
                db.executemany("INSERT OR REPLACE INTO emb (key, vec, cut) VALUES (?, ?, ?)", data)
        except (OSError, sqlite3.Error) as e:
            log.warning("text embedding cache %s not written (%s); the texts will be encoded again", self.path, e)


# --------------------------------------------------------------------------- the encoder
class ClipText:
    """The ``clip`` text encoder: title + tags -> the CLIP text tower -> PCA to ``dim`` (module docstring).

    ``clip_model``, ``clip_pretrained``, ``checkpoint`` and ``force_quick_gelu`` choose the model and weights as
    the image side does (``smp.clip``); ``device`` runs it ("auto": CUDA if there); ``cache_dir`` roots the
    embedding cache as ``EmbedCfg.cache_dir`` does; ``batch_size`` texts go through the model at once.
    """

    name = "text"
    required = ("Title", "Alltags")

    def __init__(self, dim: int = 32, clip_model: str = PAPER_CLIP_MODEL,
                 clip_pretrained: str = PAPER_CLIP_PRETRAINED, checkpoint: str = "", batch_size: int = 64,
                 device: str = "cpu", force_quick_gelu: bool = False, cache_dir: str = ""):
        self.dim, self.batch_size, self.cache_dir = dim, batch_size, cache_dir
        self.clip_model, self.clip_pretrained, self.checkpoint = clip_model, clip_pretrained, checkpoint
        self.device, self.force_quick_gelu = device, force_quick_gelu

    # the loaded model is the process's (``_TOWERS``), never the pickle's
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_tower"}

    def _clip_cfg(self) -> ClipCfg:
        return ClipCfg(clip_model=self.clip_model, clip_pretrained=self.clip_pretrained, checkpoint=self.checkpoint,
                       device=self.device, clip_cache_dir="", force_quick_gelu=self.force_quick_gelu)

    @property
    def spec(self) -> dict:
        """``smp.clip.model_spec`` of the weights: the fitted one after ``fit_transform`` (what the PCA saw)."""
        if "spec_" in self.__dict__:
            return self.spec_
        if "_spec" not in self.__dict__:  # hashing a checkpoint file once, not on every key
            self._spec = model_spec(self._clip_cfg())
        return self._spec

    @property
    def identity(self) -> str:
        """The encoder and its weights in a few characters, e.g. ``clip:RN50/openai``, ``clip:RN50/none``
        (random weights), ``clip:RN50/ckpt-<sha256[:16]>`` (a local file)."""
        spec = self.spec
        weights = "none" if spec["random_weights"] else spec["weights_id"]
        return f"clip:{spec['model']}/{weights}" + ("/quickgelu" if spec["force_quick_gelu"] else "")

    def _cache(self) -> TextCache:
        spec = self.spec
        name = "__".join([spec["model"], spec["weights_id"], spec["precision"], f"t{TEXT_VERSION}"]
                         + (["quickgelu"] if spec["force_quick_gelu"] else []))
        folder = features_root(self.cache_dir) / "text" / re.sub(r"[^A-Za-z0-9._-]+", "_", name)
        return TextCache(folder, int(spec["embedding_dim"]))

    def _keys(self, texts: list[str]) -> list[str]:
        head = f"{self.identity}\n{TEXT_VERSION}\n"
        return [hashlib.sha256((head + t).encode("utf-8", "surrogatepass")).hexdigest() for t in texts]

    def _loaded(self) -> _Tower:
        if self.__dict__.get("_tower") is None:
            tower = _tower(self._clip_cfg())
            if tower.spec["weights_id"] != self.spec["weights_id"]:
                raise RuntimeError(f"text encoder {self.identity} was fitted on weights {self.spec['weights_id']}, "
                                   f"but {self.clip_model} now loads {tower.spec['weights_id']} (checkpoint "
                                   f"{self.checkpoint or '-'} changed?)")
            self._tower = tower
        return self._tower

    def check(self, posts: pd.DataFrame) -> None:
        _refuse_missing(self.name, posts, self.required, any_of=True)

    def _embed(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
        """Rows of ``encode_text`` for ``texts`` (NaN for ``""``), whether the tokenizer cut each, and how many
        distinct texts came from the cache."""
        spec = self.spec
        width = int(spec["embedding_dim"])
        E = np.full((len(texts), width), np.nan, dtype=np.float32)
        cut = np.zeros(len(texts), dtype=bool)
        rows: dict[str, list[int]] = {}
        for i, text in enumerate(texts):
            if text:
                rows.setdefault(text, []).append(i)
        unique = list(rows)
        keys = self._keys(unique)
        cache = self._cache()
        stored = cache.get(keys)
        todo = [j for j, k in enumerate(keys) if k not in stored]
        for text, key in zip(unique, keys):
            if key in stored:
                E[rows[text]], cut[rows[text]] = stored[key]
        for start in range(0, len(todo), WRITE_EVERY):
            block = todo[start:start + WRITE_EVERY]
            new, new_cut = self._encode([unique[j] for j in block])
            for j, row, c in zip(block, new, new_cut):
                E[rows[unique[j]]], cut[rows[unique[j]]] = row, c
            cache.put([keys[j] for j in block], new, new_cut)
        return E, cut, len(unique) - len(todo)

    def _encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``encode_text`` of each text in batches (float32), and whether the tokenizer cut it."""
        tower = self._loaded()
        cut, pad = self._token_cut(texts)
        tokens = tower.tokenizer(texts, context_length=tower.context_length)
        # texts of a length together: a batch is then trimmed to its longest text (encode_trimmed)
        order = np.argsort((tokens != pad).sum(dim=1).numpy(), kind="stable")
        out = np.empty((len(texts), int(self.spec["embedding_dim"])), dtype=np.float32)
        amp = torch.autocast("cuda", dtype=torch.float16) if tower.amp else contextlib.nullcontext()
        with torch.inference_mode(), amp:
            for start in range(0, len(texts), self.batch_size):
                rows = order[start:start + self.batch_size]
                batch = tokens[torch.from_numpy(rows)].to(tower.device)
                out[rows] = encode_trimmed(tower.model, batch, pad).float().cpu().numpy()
        return out, cut

    def _token_cut(self, texts: list[str]) -> tuple[np.ndarray, object]:
        """Whether the tokenizer's context cuts each text (tokenizing only, no encoding), and the pad token."""
        tower = self._loaded()
        ctx = tower.context_length
        # one token more than the context: a text still there in the last place was longer than the context
        pad = tower.tokenizer([""], context_length=ctx + 1)[0, -1]
        long = tower.tokenizer(texts, context_length=ctx + 1)
        return (long[:, ctx] != pad).numpy(), pad

    @staticmethod
    def _normalized(E: np.ndarray) -> np.ndarray:
        # CLIP compares texts by angle; a vector's length says little about the text
        norm = np.linalg.norm(E, axis=1, keepdims=True)
        return E / np.where(norm > 0, norm, 1.0)

    def fit_transform(self, posts, y, seed: int = 0, split: str = "random") -> np.ndarray:
        from sklearn.decomposition import PCA

        self.check(posts)
        self.__dict__.pop("spec_", None)  # a refit reads the weights' spec again (a checkpoint may have changed)
        self.spec_ = self.__dict__.pop("_spec", None) or model_spec(self._clip_cfg())
        texts, cut = post_texts(posts)
        E, token_cut, hits = self._embed(texts)
        empty = np.array([not t for t in texts])
        fit_rows = self._normalized(E[~empty])
        if len(fit_rows) == 0:
            raise DataError(f"features: group {self.name!r}: no training post has a title or tags left once "
                            f"NUL bytes and blanks are dropped; leave {self.name!r} out of features")
        k = int(max(1, min(self.dim, *fit_rows.shape)))
        self.pca_ = PCA(n_components=k, random_state=seed).fit(fit_rows)
        self.feature_names_ = [f"text_{i}" for i in range(k)]
        self.facts_ = {"features/text_truncated_train": int((cut | token_cut).sum()),
                       "features/text_empty_train": int(empty.sum()), "features/text_cache_hits": hits,
                       "features/text_encoder": self.identity}
        return self._project(E, empty)

    def _project(self, E: np.ndarray, empty: np.ndarray) -> np.ndarray:
        Z = np.full((len(E), len(self.feature_names_)), np.nan, dtype=np.float32)
        if (~empty).any():
            Z[~empty] = self.pca_.transform(self._normalized(E[~empty]))
        return Z  # no title and no tags: missing, not a zero vector

    def truncated(self, posts) -> np.ndarray:
        """True for each post whose text the bounds or the tokenizer's context cut (a served post's ``partial:
        text truncated``): the tokenizer alone says so, the texts are not encoded again."""
        texts, cut = post_texts(posts)
        if not any(texts):
            return cut
        return cut | self._token_cut(texts)[0]

    def transform(self, posts) -> np.ndarray:
        texts, cut = post_texts(posts)
        E, token_cut, self.last_cache_hits_ = self._embed(texts)
        self.last_truncated_ = int((cut | token_cut).sum())
        return self._project(E, np.array([not t for t in texts], dtype=bool))

    @property
    def fields(self) -> list[str]:
        return ["Title", "Alltags"]
