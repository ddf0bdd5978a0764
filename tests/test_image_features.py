"""Handcrafted image features and decoding: behaviour checks on generated images."""

import io
import math

import cv2
import numpy as np
import pytest
from PIL import Image

from smp.image_features import (
    HANDCRAFTED,
    BadImage,
    brightness_contrast,
    clarity_contrast,
    color_entropy,
    composition_geometry,
    decode_image,
    handcrafted_features,
    hue_count,
    to_rgb_uint8,
)


def _scene(h: int = 375, w: int = 500, seed: int = 0) -> np.ndarray:
    """A photo-like RGB test image: gradient background, shapes, text, mild noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 / w, y * 255 / h, np.full((h, w), 90.0)], axis=2).astype(np.uint8)
    cv2.circle(img, (w // 3, h // 2), h // 5, (230, 40, 40), -1)
    cv2.rectangle(img, (w // 2, h // 4), (w // 2 + w // 5, h // 2), (30, 160, 220), -1)
    cv2.putText(img, "SMP", (w // 8, h - h // 8), cv2.FONT_HERSHEY_SIMPLEX, 2, (250, 250, 250), 4)
    return cv2.add(img, rng.integers(0, 8, img.shape, dtype=np.uint8))


def _jpeg(img: np.ndarray, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


# ----------------------------------------------------------------------------- direction checks


def test_blurred_copy_has_lower_clarity():
    img = _scene()
    blurred = cv2.GaussianBlur(img, (0, 0), 3)
    assert clarity_contrast(blurred) < 0.5 * clarity_contrast(img)
    assert 0.0 <= clarity_contrast(blurred) < clarity_contrast(img) <= 1.0


def test_two_colours_have_lower_hue_count_than_a_rainbow():
    two = np.zeros((100, 200, 3), np.uint8)
    two[:, :100] = (200, 30, 30)
    two[:, 100:] = (30, 30, 200)
    hsv = np.zeros((100, 360, 3), np.uint8)
    hsv[..., 0] = np.arange(360)[None, :] // 2  # OpenCV hue 0..179
    hsv[..., 1:] = 200
    rainbow = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    assert hue_count(two) == 2
    assert hue_count(rainbow) == 20
    assert hue_count(np.full((50, 50, 3), 128, np.uint8)) == 0  # grey: no colourful pixels


def test_flat_grey_has_zero_contrast_and_entropy_noise_has_more():
    flat = np.full((120, 160, 3), 128, np.uint8)
    noise = np.random.default_rng(1).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    assert brightness_contrast(flat) == 0.0
    assert color_entropy(flat) == 0.0
    assert clarity_contrast(flat) == 0.0
    assert composition_geometry(flat) == 0.0  # edge-free image is defined as centred
    assert brightness_contrast(noise) > 0.5
    assert color_entropy(noise) > 8.5  # close to log2(512) = 9 bits


def test_object_in_corner_is_off_centre():
    def canvas(cx, cy):
        img = np.full((300, 400, 3), 40, np.uint8)
        cv2.rectangle(img, (cx - 30, cy - 30), (cx + 30, cy + 30), (220, 220, 220), -1)
        return img

    centred, corner = canvas(200, 150), canvas(50, 50)
    assert composition_geometry(centred) < 0.02
    assert composition_geometry(corner) > 0.5
    assert composition_geometry(corner) <= 1.0


def test_brightness_contrast_is_the_middle_98_percent_width():
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :], 10, axis=0)  # uniform 0..255
    value = brightness_contrast(ramp)
    assert value == pytest.approx((252 - 2) / 255, abs=2 / 255)


# ----------------------------------------------------------------------------- formats and sizes


@pytest.mark.parametrize(
    "img",
    [
        pytest.param(np.full((40, 30), 100, np.uint8), id="gray2d"),
        pytest.param(np.full((40, 30, 1), 100, np.uint8), id="gray3d"),
        pytest.param(np.dstack([_scene(40, 30), np.full((40, 30), 128, np.uint8)]), id="rgba"),
        pytest.param((_scene(40, 30).astype(np.uint16) * 257), id="uint16"),
        pytest.param(_scene(40, 30).astype(np.float32) / 255, id="float01"),
        pytest.param(np.zeros((1, 1, 3), np.uint8), id="1x1"),
        pytest.param(np.zeros((2, 3, 3), np.uint8), id="2x3"),
        pytest.param(np.random.default_rng(0).integers(0, 256, (4000, 6000, 3), dtype=np.uint8), id="6000x4000"),
    ],
)
def test_any_format_and_size_gives_finite_features(img):
    feats = handcrafted_features(img)
    assert tuple(feats) == HANDCRAFTED
    assert all(isinstance(v, float) and math.isfinite(v) for v in feats.values())


def test_to_rgb_uint8_normalises():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[0, 0, 3] = 0  # fully transparent -> white
    rgba[1, 1, 3] = 255
    out = to_rgb_uint8(rgba)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == [255, 255, 255] and out[1, 1].tolist() == [255, 0, 0]
    assert to_rgb_uint8(np.full((3, 3), 65535, np.uint16)).max() == 255
    assert to_rgb_uint8(np.full((3, 3), 0.5, np.float64))[0, 0, 0] == 128
    same = np.zeros((3, 3, 3), np.uint8)
    assert to_rgb_uint8(same) is same  # no copy for the common case
    for bad in [np.zeros((3, 3, 5), np.uint8), np.zeros((3,), np.uint8), np.zeros((0, 3, 3), np.uint8),
                np.zeros((3, 3, 3), np.int32), np.zeros((2, 2, 2, 2), np.uint8)]:
        with pytest.raises(ValueError):
            to_rgb_uint8(bad)


def test_handcrafted_features_equal_the_individual_functions():
    img = _scene(120, 160)
    feats = handcrafted_features(img)
    for name, fn in zip(HANDCRAFTED, [clarity_contrast, hue_count, brightness_contrast,
                                      color_entropy, composition_geometry]):
        assert feats[name] == pytest.approx(fn(img), rel=1e-9, abs=1e-12)


# ----------------------------------------------------------------------------- decoding


def _pil_bytes(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def test_decode_formats_and_modes():
    scene = _scene(60, 80)
    rgb = decode_image(_jpeg(scene))
    assert rgb.shape == (60, 80, 3) and rgb.dtype == np.uint8
    assert np.abs(rgb.astype(int) - scene).mean() < 6  # JPEG round trip, RGB order kept
    images = {
        "palette": _pil_bytes(Image.fromarray(scene).convert("P"), "PNG"),
        "palette_gif": _pil_bytes(Image.fromarray(scene).convert("P"), "GIF"),
        "gray": _pil_bytes(Image.fromarray(scene).convert("L"), "PNG"),
        "rgba": _pil_bytes(Image.fromarray(scene).convert("RGBA"), "PNG"),
        "cmyk_jpeg": _pil_bytes(Image.fromarray(scene).convert("CMYK"), "JPEG"),
        "bilevel": _pil_bytes(Image.fromarray(scene).convert("1"), "PNG"),
    }
    ok, png16 = cv2.imencode(".png", (scene.astype(np.uint16) * 257)[..., ::-1])
    images["png16"] = png16.tobytes()
    for name, data in images.items():
        out = decode_image(data)
        assert out.shape == (60, 80, 3) and out.dtype == np.uint8, name
        assert all(math.isfinite(v) for v in handcrafted_features(out).values()), name
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    assert decode_image(_pil_bytes(Image.fromarray(red).convert("P"), "PNG"))[0, 0].tolist() == [255, 0, 0]


def test_decode_errors_have_reasons():
    data = _jpeg(_scene(60, 80))
    cases = {
        b"": "zero-byte",
        data[: len(data) // 2]: "truncated JPEG",
        b"this is not an image at all": "not an image",
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 20: "cannot decode",
    }
    for raw, reason in cases.items():
        with pytest.raises(BadImage, match=reason):
            decode_image(raw)


def test_jpeg_with_trailing_bytes_after_eoi_is_accepted():
    data = _jpeg(_scene(60, 80)) + b"\x00\x00garbage-after-EOI"
    assert decode_image(data).shape == (60, 80, 3)


def test_features_do_not_depend_on_opencv_thread_count():
    """DataLoader workers run OpenCV serially, the main process in parallel: same values."""
    img = _scene(seed=3)
    before = cv2.getNumThreads()
    try:
        values = set()
        for threads in (1, 2, 4):
            cv2.setNumThreads(threads)
            values.add(tuple(handcrafted_features(img).values()))
    finally:
        cv2.setNumThreads(before)
    assert len(values) == 1


def _png_header(width: int, height: int) -> bytes:
    """A small PNG file whose header declares ``width`` x ``height`` grey pixels (a decompression bomb's shape)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_oversized_images_are_refused_from_the_header_before_decoding(monkeypatch):
    from smp import image_features
    from smp.image_features import MAX_PIXELS, BadImage, check_image_header, decode_image

    def no_decode(*args, **kwargs):
        raise AssertionError("an oversized image reached the decoder")

    with monkeypatch.context() as m:
        m.setattr(image_features.cv2, "imdecode", no_decode)
        m.setattr(image_features, "_decode_pil", no_decode)
        for side in (30000, 7000):  # past Pillow's own bomb limit, and past ours only (49 MP > 40 MP)
            data = _png_header(side, side)
            assert len(data) < 1000 and side * side > MAX_PIXELS
            with pytest.raises(BadImage, match="image too large"):
                decode_image(data)
    assert check_image_header(_png_header(640, 480)) == (640, 480)
    assert check_image_header(b"not an image") is None  # the decoders decide (and refuse it)
    with pytest.raises(BadImage, match="not an image"):
        decode_image(b"not an image")
