"""Handcrafted ("high-level") image features and robust image decoding.

Every feature is a pure function: an image array in, a float out; no file I/O.
Images may be any decoded array (grayscale, RGBA, 16-bit, float in [0, 1]);
each function first normalises it with :func:`to_rgb_uint8`.

The five features follow the paper's list (clarity contrast, hue count,
brightness contrast, colour entropy, composition geometry); where a published
definition exists it is Ke, Tang & Jing, "The design of high-level features for
photo quality assessment", CVPR 2006 (referred to below as *Ke et al.*).

:func:`handcrafted_features` is the entry point used by the embedding
pipeline: it shrinks large images to :data:`MAX_SIDE` pixels on the long side
first (INTER_AREA), so its values are those of that downscaled image, and it
shares the grayscale/HSV conversions between features (< 5 ms per image).
"""

from __future__ import annotations

import io

import cv2
import numpy as np

HANDCRAFTED = (
    "clarity_contrast",
    "hue_count",
    "brightness_contrast",
    "color_entropy",
    "composition_geometry",
)
# The paper's CLIP (backbone, open_clip weights tag): the default of every job that embeds images.
PAPER_CLIP_MODEL = "RN50"
PAPER_CLIP_PRETRAINED = "openai"
MAX_SIDE = 512  # handcrafted_features downscales longer sides above this first

_HUE_BINS = 20  # Ke et al.: 20-bin hue histogram
_HUE_ALPHA = 0.05  # Ke et al.: a bin counts when above alpha * max bin
_MIN_SAT, _MIN_VAL, _MAX_VAL = 0.2, 0.15, 0.95  # Ke et al.'s "colourful pixel" bounds
_CLARITY_SIGMA = 1.0  # Gaussian low-pass (pixels) splitting low from high frequencies
_ENTROPY_BITS = 3  # bits per RGB channel in the colour histogram: 8x8x8 bins


class BadImage(ValueError):
    """Raised by :func:`decode_image` when bytes are not a usable image; `str(e)` is the reason."""


# ----------------------------------------------------------------------------- normalisation


def to_rgb_uint8(img: np.ndarray) -> np.ndarray:
    """Return `img` as an HxWx3 uint8 RGB array (the input itself when it already is one).

    Accepts HxW or HxWx1 grayscale, HxWx2 grayscale+alpha, HxWx3 RGB and HxWx4
    RGBA, in uint8, uint16 (scaled by 255/65535), bool, or float (taken as
    [0, 1], clipped, NaN -> 0). Alpha is composited on a white background.
    Raises ValueError for other shapes/dtypes or an empty image.
    """
    if not isinstance(img, np.ndarray):
        raise ValueError(f"expected a numpy array, got {type(img).__name__}")
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 2, 3, 4):
        raise ValueError(
            f"unsupported image shape {img.shape}: expected HxW, HxWx1, HxWx2, HxWx3 or HxWx4"
        )
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"empty image of shape {img.shape}")
    if img.dtype == np.uint8 and img.shape[2] == 3:
        return img

    if img.dtype == np.uint8:
        f = None
    elif img.dtype == np.uint16:
        f = img.astype(np.float32) / 65535.0
    elif img.dtype == np.bool_:
        f = img.astype(np.float32)
    elif np.issubdtype(img.dtype, np.floating):
        f = np.clip(np.nan_to_num(img.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0), 0, 1)
    else:
        raise ValueError(
            f"unsupported image dtype {img.dtype}: expected uint8, uint16, bool or float in [0, 1]"
        )

    channels = img.shape[2]
    if f is None:  # uint8 with 1, 2 or 4 channels
        if channels == 1:
            return np.repeat(img, 3, axis=2)
        f = img.astype(np.float32) / 255.0
    if channels in (2, 4):  # composite colour over white using alpha
        alpha = f[:, :, -1:]
        f = f[:, :, :-1] * alpha + (1.0 - alpha)
    if f.shape[2] == 1:
        f = np.repeat(f, 3, axis=2)
    return np.rint(f * 255.0).astype(np.uint8)


def _downscale(rgb: np.ndarray, max_side: int = MAX_SIDE) -> np.ndarray:
    """Shrink so the longer side is at most `max_side` (area interpolation); no upscaling."""
    h, w = rgb.shape[:2]
    if max(h, w) <= max_side:
        return rgb
    s = max_side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def _gray(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma (uint8), as OpenCV computes it."""
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


# ----------------------------------------------------------------------------- features on shared inputs


def _clarity(gray: np.ndarray) -> float:
    _, std = cv2.meanStdDev(gray)
    total = float(std[0, 0]) ** 2 * gray.size  # sum((Y - mean)^2)
    if total <= 1e-6 * gray.size:  # flat image: no signal, no detail
        return 0.0
    g = gray.astype(np.float32)
    low = cv2.GaussianBlur(g, (5, 5), _CLARITY_SIGMA, borderType=cv2.BORDER_REFLECT)
    high = cv2.norm(g, low, cv2.NORM_L2SQR)  # sum((Y - G * Y)^2)
    return float(min(1.0, high / total))


def _hue_count(rgb: np.ndarray) -> float:
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)  # uint8: H in [0, 180), S, V in [0, 255]
    # S > 0.2, 0.15 < V < 0.95 as inclusive uint8 bounds: S >= 52, 39 <= V <= 242
    lo = (0, int(np.floor(_MIN_SAT * 255)) + 1, int(np.floor(_MIN_VAL * 255)) + 1)
    hi = (255, 255, int(np.ceil(_MAX_VAL * 255)) - 1)
    mask = cv2.inRange(hsv, lo, hi)
    hist = cv2.calcHist([hsv], [0], mask, [_HUE_BINS], [0, 180]).ravel()
    if hist.max() <= 0:
        return 0.0
    return float(np.count_nonzero(hist > _HUE_ALPHA * hist.max()))


def _brightness_contrast(gray: np.ndarray) -> float:
    hist = cv2.calcHist([gray], [0], None, [256], [0, 256]).ravel()
    cdf = np.cumsum(hist) / gray.size
    lo = int(np.searchsorted(cdf, 0.01 - 1e-9))  # first level whose cumulative mass reaches 1%
    hi = int(np.searchsorted(cdf, 0.99 - 1e-9))  # first level whose cumulative mass reaches 99%
    return (hi - lo) / 255.0


def _color_entropy(rgb: np.ndarray) -> float:
    b = 1 << _ENTROPY_BITS
    counts = cv2.calcHist([rgb], [0, 1, 2], None, [b, b, b], [0, 256] * 3).ravel()
    p = counts[counts > 0] / (rgb.shape[0] * rgb.shape[1])
    return float(max(0.0, -np.sum(p * np.log2(p))))


def _composition_geometry(gray: np.ndarray) -> float:
    if gray.shape[0] * gray.shape[1] == 1:
        return 0.0
    # next Gaussian-pyramid level: 5x5 Gaussian smoothing + 2x decimation (denoises, 4x cheaper)
    smooth = cv2.pyrDown(gray) if min(gray.shape) >= 8 else gray
    h, w = smooth.shape
    gx = cv2.Sobel(smooth, cv2.CV_32F, 1, 0, ksize=3, borderType=cv2.BORDER_REPLICATE)
    gy = cv2.Sobel(smooth, cv2.CV_32F, 0, 1, ksize=3, borderType=cv2.BORDER_REPLICATE)
    # IEEE sqrt in numpy: cv2.magnitude gave last-bit differences once torch (oneDNN) had run
    mag = np.sqrt(gx * gx + gy * gy)
    # float64 numpy sums (no BLAS dot, whose result can depend on memory alignment)
    floor = mag.mean(dtype=np.float64)  # weak gradients (texture, noise) at or below the mean do not count
    _, weight = cv2.threshold(mag, floor, 0, cv2.THRESH_TOZERO)
    m00 = weight.sum(dtype=np.float64)
    if m00 <= 1e-6:  # no edges: defined as centred
        return 0.0
    cx = (weight.sum(axis=0, dtype=np.float64) * np.arange(w)).sum() / m00
    cy = (weight.sum(axis=1, dtype=np.float64) * np.arange(h)).sum() / m00
    dx, dy = cx - (w - 1) / 2.0, cy - (h - 1) / 2.0
    return float(min(1.0, np.hypot(dx, dy) / (np.hypot(w, h) / 2.0)))


# ----------------------------------------------------------------------------- public features


def clarity_contrast(img: np.ndarray) -> float:
    """Share of the luminance signal energy in the high-frequency band, in [0, 1].

    ``sum((Y - G_sigma * Y)^2) / sum((Y - mean(Y))^2)`` with Y the BT.601 luma and
    G_sigma a 5x5 Gaussian low-pass (sigma = 1 px). By Parseval this is the share of
    the image's spectral energy passed by the high-pass filter 1 - G_sigma: a
    spatial-domain counterpart of Ke et al.'s blur measure (the share of Fourier
    coefficients above a threshold). Luo & Tang (ECCV 2008) call "clarity
    contrast" the ratio of such a high-frequency share inside the subject region
    to the whole image's; without subject detection this is the whole-image
    share. Sharp, well-contrasted edges score high, a blurred copy of the same
    image scores lower; a flat image scores 0.
    """
    return _clarity(_gray(to_rgb_uint8(img)))


def hue_count(img: np.ndarray) -> float:
    """Number of hues with significant presence, in 0..20 (Ke et al., Sec. "Hue count").

    Pixels with saturation S > 0.2 and value 0.15 < V < 0.95 (HSV in [0, 1]) vote
    in a 20-bin hue histogram H; the count is ``|{i : H(i) > 0.05 * max(H)}|``.
    Ke et al. report the complement ``20 - count`` as a simplicity score; this is
    the count itself. An image without such pixels (grey, black, white) scores 0.
    """
    return _hue_count(to_rgb_uint8(img))


def brightness_contrast(img: np.ndarray) -> float:
    """Width of the middle 98% of the brightness histogram, in [0, 1].

    The 99th minus the 1st percentile of BT.601 luma / 255 (Ke et al.'s
    "contrast", computed on luminance). A flat image scores 0.
    """
    return _brightness_contrast(_gray(to_rgb_uint8(img)))


def color_entropy(img: np.ndarray) -> float:
    """Shannon entropy in bits of the 8x8x8-bin RGB colour histogram, in [0, 9].

    Each channel is quantised to its 3 most significant bits; a single-colour
    image scores 0, uniform noise close to 9.
    """
    return _color_entropy(to_rgb_uint8(img))


def composition_geometry(img: np.ndarray) -> float:
    """Offset of the edge centroid from the image centre, in [0, 1].

    Edge map: the Sobel gradient magnitude |grad Y| of the luma's next Gaussian
    pyramid level (5x5 Gaussian, half resolution), keeping only gradients above
    the image's mean magnitude (so fine texture and noise do not pull the
    centroid to the centre). The magnitude-weighted centroid's distance from the
    centre is divided by the half-diagonal ``sqrt(W^2 + H^2) / 2``. 0 = edges
    balanced around the centre; an edge-free (flat) image is defined as 0.
    (Ke et al. use the spatial spread of Laplacian edges; this is the centroid
    offset the paper describes.)
    """
    return _composition_geometry(_gray(to_rgb_uint8(img)))


def handcrafted_features(img: np.ndarray) -> dict[str, float]:
    """Return the five :data:`HANDCRAFTED` features of `img` as ``{name: float}``.

    Normalises with :func:`to_rgb_uint8`, shrinks the long side to
    :data:`MAX_SIDE`, computes luma once and applies each feature to it.
    """
    rgb = _downscale(to_rgb_uint8(img))
    gray = _gray(rgb)
    return {
        "clarity_contrast": _clarity(gray),
        "hue_count": _hue_count(rgb),
        "brightness_contrast": _brightness_contrast(gray),
        "color_entropy": _color_entropy(rgb),
        "composition_geometry": _composition_geometry(gray),
    }


# ----------------------------------------------------------------------------- decoding

_JPEG_SOI = b"\xff\xd8\xff"
_JPEG_EOI = b"\xff\xd9"
_PIL_MODES = {  # PIL mode -> mode converted to before to_rgb_uint8
    "1": "L", "L": "L", "LA": "LA", "P": None, "PA": "RGBA", "RGB": "RGB", "RGBA": "RGBA",
    "RGBX": "RGB", "RGBa": "RGBA", "La": "LA", "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB",
    "HSV": "RGB", "I;16": None, "I;16B": None, "I;16L": None, "I;16N": None, "I": None, "F": None,
}


def _bgr_to_rgb(img: np.ndarray) -> np.ndarray:
    if img.ndim == 3 and img.shape[2] == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if img.ndim == 3 and img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGBA)
    return img


def _jpeg_truncated(data: bytes) -> bool:
    """True when a JPEG lacks its end-of-image marker and PIL cannot fully decode it."""
    if data.rstrip(b"\x00").endswith(_JPEG_EOI):
        return False
    from PIL import Image

    try:  # trailing bytes after a valid EOI are common and harmless: let PIL judge
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception:  # noqa: BLE001 - any failure to decode fully means truncated here
        return True
    return False


def _decode_pil(data: bytes) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except UnidentifiedImageError as e:
        raise BadImage("not an image / cannot decode") from e
    except Image.DecompressionBombError as e:
        raise BadImage(f"image too large: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:
        reason = "truncated image" if "truncated" in str(e) else "not an image / cannot decode"
        raise BadImage(f"{reason} ({e})") from e
    mode = im.mode
    if mode not in _PIL_MODES:
        raise BadImage(f"unsupported colour mode {mode!r}")
    try:
        if mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        elif mode.startswith("I;16"):
            return to_rgb_uint8(np.asarray(im, dtype=np.uint16))
        elif mode in ("I", "F"):
            a = np.asarray(im, dtype=np.float64)
            top = 65535.0 if a.max() > 255 else 255.0
            return to_rgb_uint8((a / top).astype(np.float32))
        elif _PIL_MODES[mode] != mode:
            im = im.convert(_PIL_MODES[mode])
        return to_rgb_uint8(np.asarray(im))
    except (OSError, ValueError) as e:
        raise BadImage(f"unsupported colour mode {mode!r} ({e})") from e


MAX_PIXELS = 40_000_000  # width x height above this is refused from the header, before any decoding


def check_image_header(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from the encoded image's header, or None when Pillow cannot read the header;
    ``BadImage`` when the image is larger than ``MAX_PIXELS`` (a decompression bomb: a 150 KB PNG can
    declare 30,000 x 30,000 pixels, 2.7 GB decoded), so one image never costs more than a bounded decode."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
    except Image.DecompressionBombError:
        raise BadImage(f"image too large (its header declares more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels; "
                       f"the limit is {MAX_PIXELS:,})") from None
    except Exception:  # noqa: BLE001 - a header Pillow cannot parse: the decoders decide
        return None
    if width * height > MAX_PIXELS:
        raise BadImage(f"image too large: {width} x {height} pixels, the limit is {MAX_PIXELS:,} "
                       "(smp.image_features.MAX_PIXELS)")
    return width, height


MAX_IMAGE_BYTES = 50_000_000  # an encoded image above this is refused unread (SMPD's JPEGs are ~100 KB)


def bytes_problem(n_bytes: int) -> str | None:
    """Why an encoded image of ``n_bytes`` is refused before it is read (empty or over ``MAX_IMAGE_BYTES``), or None."""
    if n_bytes == 0:
        return "zero-byte file"
    if n_bytes > MAX_IMAGE_BYTES:
        return (f"image too large: {n_bytes:,} bytes, the limit is {MAX_IMAGE_BYTES:,} "
                "(smp.image_features.MAX_IMAGE_BYTES)")
    return None


def path_problem(path: str) -> str | None:
    """Why ``path`` cannot name an image file, judged from its text alone, or None: a NUL byte, which no
    file system allows (``os.stat`` and ``open`` raise ValueError on one, not OSError)."""
    return "the path holds a NUL byte" if "\0" in path else None


def image_problem(data: bytes, complete: bool = True) -> str | None:
    """Why encoded image bytes cannot be used, judged without decoding them, or None (decoding decides).

    Checks the size (``bytes_problem``; skipped when ``data`` is only the file's first bytes,
    ``complete=False``) and the pixel count the header declares (``check_image_header``): cheap, so a
    server can turn a decompression bomb away per post before any decoder allocates its pixels.
    """
    if complete:
        problem = bytes_problem(len(data))
        if problem is not None:
            return problem
    try:
        check_image_header(data)
    except BadImage as exc:
        return str(exc)
    return None


def decode_image(data: bytes) -> np.ndarray:
    """Decode encoded image bytes to an HxWx3 uint8 RGB array, or raise :class:`BadImage`.

    OpenCV decodes first (JPEG with EXIF orientation applied; other formats
    unchanged, so alpha and 16-bit are normalised by :func:`to_rgb_uint8`), PIL
    is the fallback for formats or modes OpenCV refuses (e.g. GIF, palette
    modes). Reasons: "zero-byte file", "truncated JPEG" (no end-of-image
    marker and PIL cannot decode it fully, rather than accepting a grey-filled
    half), "not an image / cannot decode", "unsupported colour mode ...".
    """
    if not data:
        raise BadImage("zero-byte file")
    is_jpeg = data[:3] == _JPEG_SOI
    check_image_header(data)  # before any decoding: OpenCV would decode a bomb fully (it refuses only > 2^30 px)
    if is_jpeg and _jpeg_truncated(data):
        raise BadImage("truncated JPEG")
    buf = np.frombuffer(data, dtype=np.uint8)
    flags = cv2.IMREAD_COLOR if is_jpeg else cv2.IMREAD_UNCHANGED
    try:
        img = cv2.imdecode(buf, flags)
    except cv2.error:
        img = None
    if img is None or img.size == 0:
        return _decode_pil(data)
    try:
        return to_rgb_uint8(_bgr_to_rgb(img))
    except ValueError as e:  # e.g. a 32-bit integer TIFF
        raise BadImage(f"unsupported colour mode ({e})") from e
