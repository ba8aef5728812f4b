"""``colour_jpeg_frame``: the v3 loader's header shortcut says what ``Image.open`` says, or
nothing, on generated JPEGs of every kind Pillow writes and on the same files damaged."""

import io
import random

import numpy as np
import pytest
from PIL import Image

from serving import preprocessing
from serving.preprocessing import CV2_JPEG, JpegFrame, colour_jpeg_frame, decode_and_resize


def encode(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, **{"format": "JPEG", **options})
    return buffer.getvalue()


def photo(size=(40, 30), seed=0) -> Image.Image:
    noise = np.random.default_rng(seed).integers(0, 255, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(noise).resize(size, Image.Resampling.BICUBIC)


def exif_rotated() -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = 6
    return exif


def mpo(first: Image.Image) -> bytes:
    buffer = io.BytesIO()
    first.save(buffer, format="MPO", save_all=True, append_images=[first.rotate(180)])
    return buffer.getvalue()


ICC = b"\x00" * 128 + b"acsp" + b"\x00" * 100  # opaque to JPEG: Pillow carries it in APP2 chunks
# Files the shortcut answers for (colour JPEGs without EXIF, MPF or Photoshop segments) ...
TAKEN = {
    "baseline": lambda: encode(photo()),
    "progressive": lambda: encode(photo(), progressive=True),
    "optimized 4:4:4": lambda: encode(photo(), optimize=True, subsampling=0, quality=95),
    "restart markers": lambda: encode(photo((64, 48)), restart_marker_rows=1),
    "comment and dpi": lambda: encode(photo(), comment=b"\xff\xda\xff\xd8 a comment", dpi=(300, 300)),
    "ICC profile": lambda: encode(photo(), icc_profile=ICC),
    "ICC in chunks": lambda: encode(photo(), icc_profile=ICC * 400),
    "XMP": lambda: encode(photo(), xmp=b"<x:xmpmeta/>"),
    "RGB, not YCbCr": lambda: encode(photo(), keep_rgb=True),
    "large": lambda: encode(photo((3000, 2000)), quality=30),
}
# ... and those it leaves to Pillow.
LEFT = {
    "grayscale": lambda: encode(photo().convert("L")),
    "grayscale progressive": lambda: encode(photo().convert("L"), progressive=True),
    "CMYK": lambda: encode(photo().convert("CMYK")),
    "EXIF": lambda: encode(photo(), exif=exif_rotated()),
    "multi-picture (MPO)": lambda: mpo(photo()),
    "not a JPEG": lambda: photo().tobytes(),
}


def assert_as_pillow_says(data: bytes) -> JpegFrame | None:
    """Where the shortcut answers, ``Image.open`` opens the same colour JPEG frame."""
    frame = colour_jpeg_frame(data)
    if frame is not None:
        image = Image.open(io.BytesIO(data))
        assert (image.format, image.mode) == ("JPEG", "RGB")
        assert image.size == (frame.width, frame.height)
        assert bool(image.info.get("progressive")) == frame.progressive
    return frame


@pytest.mark.parametrize("kind", sorted(TAKEN))
def test_the_frame_of_a_colour_jpeg_is_the_one_pillow_reads(kind):
    data = TAKEN[kind]()
    frame = assert_as_pillow_says(data)
    assert frame is not None
    assert frame.progressive == (kind == "progressive")


@pytest.mark.parametrize("kind", sorted(LEFT))
def test_other_jpegs_and_other_bytes_are_left_to_pillow(kind):
    assert colour_jpeg_frame(LEFT[kind]()) is None


def with_segment(data: bytes, marker: int, payload: bytes) -> bytes:
    """``data`` with one more segment just after its start-of-image marker."""
    return data[:2] + bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:]


@pytest.mark.parametrize("marker, payload", [(0xE0, b"JFIF\x00\x01"), (0xEE, b"Adobe\x00"),
                                             (0xE2, b"ICC_PROFILE\x00\x01")])
def test_a_segment_too_short_for_the_fields_pillow_reads_is_left_to_pillow(marker, payload):
    data = with_segment(TAKEN["baseline"](), marker, payload)
    with pytest.raises(Image.UnidentifiedImageError):
        Image.open(io.BytesIO(data))
    assert colour_jpeg_frame(data) is None
    assert colour_jpeg_frame(with_segment(TAKEN["baseline"](), marker, payload + b"\x00")) is not None


def test_a_second_frame_header_is_left_to_pillow():
    """Pillow takes the last frame header's size: the shortcut answers for one frame only."""
    data = TAKEN["baseline"]()
    assert colour_jpeg_frame(with_segment(data, 0xC0, bytes([8, 0, 10, 0, 10, 3, 1, 0x11, 0, 2, 0x11, 1,
                                                           3, 0x11, 1]))) is None


def header_end(data: bytes) -> int:
    """Just past the first start-of-scan segment (of an undamaged file): what the shortcut reads."""
    position = 2
    while True:
        marker, length = data[position + 1], int.from_bytes(data[position + 2:position + 4], "big")
        position += 2 + length
        if marker == 0xDA:
            return position


def damaged(seed: int = 7, per_file: int = 60) -> list[bytes]:
    """Each generated file cut short at each of its first 400 header bytes and ~100 more, and
    with one to three of its header bytes overwritten (0xFF, 0x00, a marker byte or any byte)
    ``per_file`` times."""
    generator = random.Random(seed)
    out = []
    for make in (*TAKEN.values(), *LEFT.values()):
        data = make()
        if not data.startswith(b"\xff\xd8"):
            continue
        end = header_end(data)
        cuts = range(2, min(end + 4, len(data)))
        out += [data[:cut] for cut in cuts if cut < 400 or generator.random() < 100 / len(cuts)]
        for _ in range(per_file):
            broken = bytearray(data)
            for _ in range(generator.randint(1, 3)):
                broken[generator.randrange(2, end)] = generator.choice(
                    [0xFF, 0x00, 0xC0, 0xC2, 0xC3, 0xDA, 0xD9, 0xE1, generator.randrange(256)])
            out.append(bytes(broken))
    return out


def test_on_damaged_headers_the_shortcut_never_says_other_than_pillow():
    """Truncated and corrupted headers: where the shortcut answers, Pillow opens the same colour
    frame; where Pillow refuses, the shortcut never answers. The shortcut must answer for some
    damaged files too (damage past the header), or the check above would prove nothing."""
    answered = sum(assert_as_pillow_says(data) is not None for data in damaged())
    assert answered > 100


def test_decoding_with_the_shortcut_gives_the_same_pixels_or_error_as_without(monkeypatch):
    """The v3 loader through the shortcut and through ``Image.open`` (the shortcut switched
    off): the same pixels, or the same error type and message, for good and damaged files,
    the pixel cap and the scan limit included."""
    files = [make() for make in (*TAKEN.values(), *LEFT.values())] + damaged(seed=11, per_file=15)

    def outcome(data: bytes, **limits):
        try:
            return decode_and_resize(data, (16, 16), preprocessing=CV2_JPEG, **limits)
        except Exception as error:  # noqa: BLE001 - the error is the outcome compared
            return type(error), str(error)

    cases = [(data, {}) for data in files] + [
        (TAKEN["baseline"](), {"max_pixels": 40 * 30 - 1}),
        (TAKEN["progressive"](), {"max_jpeg_scans": 9}),
        (TAKEN["progressive"](), {"max_jpeg_scans": 10})]
    fast = [outcome(data, **limits) for data, limits in cases]
    monkeypatch.setattr(preprocessing, "colour_jpeg_frame", lambda data: None)
    for (data, limits), got in zip(cases, fast, strict=True):
        expected = outcome(data, **limits)
        if isinstance(expected, np.ndarray):
            np.testing.assert_array_equal(got, expected)
        else:
            assert got == expected
    assert fast[-3][0].__name__ == "ImageTooLargeError" and fast[-2][0].__name__ == "TooManyScansError"
