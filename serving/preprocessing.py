"""Image bytes -> model-ready uint8 RGB array: the one function training and scoring share.

Four loaders, each a versioned preprocessing recorded in a model's metadata:
- ``pillow-rgb-draft-v1`` (petscore's own, ``model.train``'s default before v3: what most existing
  directories record), described below: full-size decode unless the JPEG is over twice the
  target, then Pillow's antialiased resize;
- ``pillow-draft-cv2-v2`` (opt-in, ``model.train --preprocessing``): the decoding and colour
  handling of v1, but the JPEG is decoded at the DCT scale that keeps at least half the target
  size on each side (other formats are box-reduced by an integer factor while they stay at least
  the target size), then stretched with OpenCV's bilinear resize: 2.7-3.0x cheaper per image
  (``bench/pixels.py``), and 0.35-0.45 points less accurate for the real alpha 0.25 model,
  cross-validated on 2,000 photos (``bench/accuracy.py``: 95% interval -0.95 to +0.25 with
  ``model.train``'s 30 epochs, -1.0 to +0.05 with 8);
- ``cv2-jpeg-v3`` (``model.train``'s default): a colour JPEG (or the first image of a phone's
  multi-picture JPEG) is decoded by OpenCV (the same libjpeg-turbo pixels as
  Pillow's, EXIF orientation applied) at v1's DCT scale, so it keeps the full target
  resolution, then stretched with OpenCV's bilinear resize; anything else is decoded as in v1
  and resized as in v2: 2.4x cheaper than v1 per real photo (``bench/pixels.py``);
- ``keras-load-img-v1``: exactly what ``keras.utils.load_img`` and
  ``ImageDataGenerator.flow_from_directory`` do (full decode, Pillow ``convert("RGB")``, no EXIF
  rotation, resize with Keras's interpolation, ``nearest`` by default), for models trained in
  notebooks and brought in with ``python -m model.package``. Scoring a model through the loader
  it was trained with is what makes its scores equal to the notebook's;
- ``pillow-fit-v1``: what Teachable Machine's exported Python sample does before
  ``model.predict`` (``Image.open(path).convert("RGB")``, then ``ImageOps.fit`` to the input
  size: the largest centred crop of the input's aspect ratio, resized with LANCZOS by default),
  for its ``keras_model.h5``.

Every loader refuses a progressive JPEG of more than ``max_jpeg_scans`` scans before decoding
it (``check_jpeg_scans``): its decode costs a pass over the whole image per scan, and a file can
carry thousands (libjpeg-turbo#284, whose maintainers leave the limit to the application, as
TurboJPEG's ``TJPARAM_SCANLIMIT`` does, for progressive JPEGs: a baseline decoder stops once the
image is whole, whatever scans follow).

Every loader opens the bytes with ``open_image``: Pillow's own formats, AVIF (Pillow 12's wheels
carry libavif) and HEIF/HEIC, what phones save by default, through pillow-heif's plugin (libheif
applies the file's rotation, so a phone's HEIC photo comes out upright in every loader, as its
JPEG does in petscore's). Bytes that are no image Pillow reads are refused saying what they are
(``describe_bytes``).

Pillow does the decoding rather than ``tf.io.decode_image`` because TF cannot honour EXIF
orientation, convert CMYK or palette-with-transparency images faithfully, decode at reduced
DCT scale (``draft``), or refuse a decompression bomb from the header before decoding.
Whatever this module does to an image, it does identically at training and scoring time, so
there is no training/serving skew; its behaviour is versioned by ``PREPROCESSING_VERSION``
and recorded in each model's metadata.
"""

from __future__ import annotations

import io
import re

import numpy as np
import pillow_heif
from PIL import Image, ImageOps, UnidentifiedImageError

PREPROCESSING_VERSION = "pillow-rgb-draft-v1"
PILLOW_DRAFT_V1 = PREPROCESSING_VERSION
PILLOW_DRAFT_CV2 = "pillow-draft-cv2-v2"
CV2_JPEG = "cv2-jpeg-v3"
KERAS_LOAD_IMG = "keras-load-img-v1"
PILLOW_FIT = "pillow-fit-v1"
RESIZE_METHODS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
# keras.utils.image_utils.PIL_INTERPOLATION_METHODS
KERAS_INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC, "hamming": Image.Resampling.HAMMING,
    "box": Image.Resampling.BOX, "lanczos": Image.Resampling.LANCZOS,
}
# preprocessing version -> the resize methods it knows
CV2_RESIZE_METHODS = {"bilinear": "INTER_LINEAR"}  # OpenCV flag names (cv2 is imported lazily)
PREPROCESSING_VERSIONS = {PILLOW_DRAFT_V1: RESIZE_METHODS, PILLOW_DRAFT_CV2: CV2_RESIZE_METHODS,
                          CV2_JPEG: CV2_RESIZE_METHODS, KERAS_LOAD_IMG: KERAS_INTERPOLATIONS,
                          PILLOW_FIT: KERAS_INTERPOLATIONS}
# JPEG DCT scale -> OpenCV's flag that decodes at it (EXIF orientation applied, 3-channel BGR)
CV2_REDUCED_FLAGS = {1: "IMREAD_COLOR", 2: "IMREAD_REDUCED_COLOR_2", 4: "IMREAD_REDUCED_COLOR_4",
                     8: "IMREAD_REDUCED_COLOR_8"}
DEFAULT_MAX_PIXELS = 64_000_000
# Scans per progressive JPEG: Pillow's, cjpeg -progressive's and jpegtran -progressive's have 10
# (6 in grayscale); every one of 2,200 real photos (Kaggle's) is baseline (1 scan); NVIDIA DALI
# refuses above 500. 110 scans of a 12 MP image decode in about 3 s (docs/inputs.md).
DEFAULT_MAX_JPEG_SCANS = 100
JPEG_START_OF_SCAN = b"\xff\xda"
# The marker after a scan's entropy-coded data: 0xFF (and fill 0xFFs) then a byte other than a
# stuffed 0x00 or a restart marker RST0-RST7 (T.81 B.1.1.5; libjpeg-turbo's jpeg_fill_bit_buffer).
JPEG_MARKER_AFTER_SCAN = re.compile(rb"\xff+[^\x00\xd0-\xd7\xff]")
JPEG_MARKERS_WITHOUT_LENGTH = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0-RST7
JPEG_END_OF_IMAGE = 0xD9
JPEG_START_OF_SCAN_MARKER = 0xDA
EXIF_ORIENTATION = 0x0112
# Pillow warns above its own bomb limit; we enforce ours from the header instead.
Image.MAX_IMAGE_PIXELS = None
pillow_heif.register_heif_opener()  # HEIF/HEIC for Image.open; AVIF stays with Pillow's own plugin
# ISO base media file brands (bytes 8-12 of an "ftyp" box) -> what the file holds
FTYP_BRANDS = {
    **dict.fromkeys((b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"),
                    "a HEIF/HEIC image"),
    **dict.fromkeys((b"avif", b"avis"), "an AVIF image"),
    b"qt  ": "a QuickTime (MOV) video",
    **dict.fromkeys((b"isom", b"iso2", b"mp41", b"mp42", b"avc1", b"dash", b"M4V ", b"3gp4", b"3gp5",
                     b"3g2a"), "an MP4 video"),
    b"M4A ": "an MPEG-4 audio file",
}
# Leading bytes -> what the file is (the first that matches); images Pillow reads when intact
# are named too, so a truncated header reads as such.
MAGIC_NUMBERS = (
    (b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"GIF8", "a GIF image"), (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"),
    (b"BM", "a BMP image"), (b"\x00\x00\x00\x0cJXL ", "a JPEG XL image"),
    (b"\xff\x0a", "a JPEG XL image"), (b"%PDF-", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive (or a file in one: .docx, .xlsx, .epub)"),
    (b"PK\x05\x06", "an empty ZIP archive"), (b"\x1f\x8b", "GZIP-compressed data"),
    (b"BZh", "BZIP2-compressed data"), (b"\xfd7zXZ\x00", "XZ-compressed data"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"), (b"Rar!\x1a\x07", "a RAR archive"),
    (b"\x1aE\xdf\xa3", "a Matroska/WebM video"), (b"\x7fELF", "an ELF executable"),
    (b"MZ", "a Windows executable"),
)
RIFF_KINDS = {b"WEBP": "a WebP image", b"AVI ": "an AVI video", b"WAVE": "a WAV audio file"}


class EmptyImageError(ValueError):
    """The file has no bytes at all."""


class ImageTooLargeError(ValueError):
    """The header declares more pixels than the configured cap (a likely decompression bomb)."""


class TooManyScansError(ValueError):
    """A progressive JPEG holds more scans than the configured cap (it could take minutes to
    decode)."""


def check_jpeg_scans(data: bytes, max_scans: int) -> None:
    """Raise ``TooManyScansError`` when the first image of the JPEG ``data`` holds more than
    ``max_scans`` scans (start-of-scan markers, 0xFF 0xDA).

    Every scan starts with such a marker, and no scan's data holds one: entropy-coded data
    stuffs a 0x00 after each 0xFF, and the only markers inside it are RST0-RST7 (T.81 B.1.1.5).
    So the number of 0xFF 0xDA pairs in the bytes is never below the scan count, and counting
    them (0.06 ms for a photo of the Kaggle set) clears every ordinary file. Only above the cap
    are the markers walked as libjpeg-turbo reads them, so that bytes inside other segments (an
    EXIF thumbnail, an ICC profile) or after the first image (a phone's MPO) are not counted."""
    if data.count(JPEG_START_OF_SCAN) <= max_scans:
        return
    scans = jpeg_scan_count(data)
    if scans > max_scans:
        raise TooManyScansError(f"a JPEG of {scans} scans exceeds the limit of {max_scans} scans per "
                                "image: decoding it would take a pass over the whole image per scan "
                                "(--max-jpeg-scans raises the limit)")


def jpeg_scan_count(data: bytes) -> int:
    """The scans of the first image of a JPEG (up to its end-of-image marker), counted as
    libjpeg-turbo's reader meets them: bytes before a marker are skipped to the next 0xFF, a
    segment's length field skips its payload, and a scan's entropy-coded data ends at the
    first marker that is not a restart marker (``JPEG_MARKER_AFTER_SCAN``)."""
    position, scans = 2, 0  # past the start-of-image marker
    while (marker_at := data.find(b"\xff", position)) >= 0:
        position = marker_at + 1
        while position < len(data) and data[position] == 0xFF:  # fill bytes
            position += 1
        if position >= len(data) or data[position] == JPEG_END_OF_IMAGE:
            break
        marker = data[position]
        position += 1
        if marker in JPEG_MARKERS_WITHOUT_LENGTH or marker == 0x00:
            continue
        position += int.from_bytes(data[position:position + 2], "big")  # the length counts itself
        if marker == JPEG_START_OF_SCAN_MARKER:
            scans += 1
            following = JPEG_MARKER_AFTER_SCAN.search(data, position)
            position = following.start() if following else len(data)
    return scans


def open_image(data: bytes) -> Image.Image:
    """``Image.open`` of ``data`` (lazy: the header only), with HEIF/HEIC and AVIF registered.
    Raises ``PIL.UnidentifiedImageError`` naming what the bytes are (``describe_bytes``) instead
    of Pillow's ``cannot identify image file <_io.BytesIO object at 0x…>``."""
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        kind = describe_bytes(data)
        if kind.endswith(" image"):
            raise UnidentifiedImageError(f"{kind} that cannot be read: truncated or corrupt, or an "
                                         "encoding no installed codec decodes") from None
        raise UnidentifiedImageError(f"not an image: {kind}") from None


def describe_bytes(data: bytes) -> str:
    """What ``data`` is, from its first bytes, in a few words: an image format (then it is
    truncated or corrupt, or a variant no installed codec decodes), HEIF/AVIF/MP4/MOV by their
    ISO ``ftyp`` brand, RIFF kinds (WebP, AVI, WAV), PDF, HTML, SVG, XML, archives and compressed
    data, executables, UTF-8 text (with its first line), or unrecognised binary data with its
    first bytes in hex. For error messages: never the address of a Python object."""
    if not data:
        return "an empty file (0 bytes)"
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        return FTYP_BRANDS.get(brand, f"an ISO media file (brand {brand.decode('latin-1')!r})")
    if data[:4] == b"RIFF":
        return RIFF_KINDS.get(data[8:12], "a RIFF file")
    for magic, kind in MAGIC_NUMBERS:
        if data.startswith(magic):
            return kind
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head[:256]:
        return "an HTML page (a web page saved as an image, or an error page downloaded instead)"
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in head):
        return "an SVG drawing (vector graphics: rasterise it first)"
    if head.startswith(b"<?xml"):
        return "an XML document"
    window = data[:512]
    try:
        text = window.decode("utf-8")
    except UnicodeDecodeError as error:  # forgiven only for a character the window cuts in two
        cut = len(data) > len(window) and error.start > len(window) - 4
        text = window[:error.start].decode("utf-8") if cut else None
    if text is not None and all(c.isprintable() or c in "\t\r\n" for c in text.lstrip("\ufeff")):
        first = next((line.strip() for line in text.lstrip("\ufeff").splitlines() if line.strip()), "")
        return f"text (first line {first[:60]!r})"
    return f"unrecognised binary data (first bytes {data[:8].hex(' ')})"


def decode_and_resize(
    data: bytes,
    size: tuple[int, int],
    resize_method: str = "bilinear",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    preprocessing: str = PREPROCESSING_VERSION,
    out: np.ndarray | None = None,
    max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS,
) -> np.ndarray:
    """Decode any Pillow-readable image and stretch it to ``size`` = (height, width) the way
    the ``preprocessing`` version says.

    Contract: returns a ``(height, width, 3)`` uint8 array: ``out`` itself when given (a row of
    a batch's array, say), which OpenCV's steps write straight into and the others copy into;
    the pixels are the same either way. Raises on empty, truncated, unknown
    or oversized input (``ImageTooLargeError``, checked from the header before decoding with
    either loader) and on a progressive JPEG of more than ``max_jpeg_scans`` scans
    (``TooManyScansError``, checked from the bytes before decoding); callers turn that into an
    error row.
    ``pillow-rgb-draft-v1``: EXIF orientation is applied, the first frame of an animation is
    used, grayscale/CMYK/palette/16-bit images become RGB and transparent pixels are composited
    over white.
    ``keras-load-img-v1``: whatever ``keras.utils.load_img`` + ``img_to_array`` give, to the bit;
    ``pillow-fit-v1``: whatever ``ImageOps.fit(image.convert("RGB"), size, method)`` gives.
    """
    if not data:
        raise EmptyImageError("empty file (0 bytes)")
    methods = PREPROCESSING_VERSIONS.get(preprocessing)
    if methods is None:
        raise ValueError(f"unknown preprocessing {preprocessing!r}; known: {sorted(PREPROCESSING_VERSIONS)}")
    if resize_method not in methods:
        raise ValueError(f"unknown resize method {resize_method!r} for {preprocessing}; "
                         f"known: {sorted(methods)}")
    height, width = size
    with open_image(data) as image:
        pixels = image.width * image.height
        if pixels > max_pixels:
            raise ImageTooLargeError(
                f"{image.width}x{image.height} = {pixels} pixels exceeds the cap of {max_pixels}"
            )
        if image.format in ("JPEG", "MPO") and image.info.get("progressive"):
            check_jpeg_scans(data, max_jpeg_scans)
        if preprocessing == KERAS_LOAD_IMG:
            return _into(out, _keras_load_img(image, width, height, methods[resize_method]))
        if preprocessing == PILLOW_FIT:
            fitted = ImageOps.fit(image.convert("RGB"), (width, height), methods[resize_method])
            return _into(out, np.asarray(fitted, dtype=np.uint8))
        # JPEG only: decode at the smallest DCT scale that still covers the target size (v1, v3)
        # or half of it (v2) on both sides, whatever the EXIF rotation does to the axes.
        longest = max(height, width)
        if preprocessing == CV2_JPEG and image.format in ("JPEG", "MPO") and image.mode == "RGB":
            return _cv2_jpeg(data, image.size, longest, width, height, methods[resize_method], out)
        cover = max(1, longest // 2) if preprocessing == PILLOW_DRAFT_CV2 else longest
        image.draft("RGB", (cover, cover))
        image.load()
        if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
            image = ImageOps.exif_transpose(image)
        rgb = _to_rgb(image)
        if preprocessing == PILLOW_DRAFT_V1:
            return _into(out, np.asarray(rgb.resize((width, height), RESIZE_METHODS[resize_method]),
                                         dtype=np.uint8))
        return _cv2_resize(rgb, width, height, methods[resize_method], out)


def _into(out: np.ndarray | None, pixels: np.ndarray) -> np.ndarray:
    """``pixels``, copied into ``out`` when there is one (OpenCV reallocates a ``dst`` of the
    wrong shape or type rather than failing: this copy is then what keeps the contract)."""
    if out is None or pixels is out:
        return pixels
    out[...] = pixels
    return out


def _cv2_jpeg(data: bytes, stored: tuple[int, int], cover: int, width: int, height: int,
              method: str, out: np.ndarray | None = None) -> np.ndarray:
    """v3, colour JPEGs: OpenCV's libjpeg-turbo decodes at v1's DCT scale (the same pixels as
    Pillow's decode, without Pillow's 4-byte pixels and the copy out of them) and applies the EXIF
    orientation; then OpenCV's bilinear resize. After that DCT scale no step shrinks a side 2x or
    more (the short side), so skipping the antialiasing costs little."""
    import cv2

    factor = min(stored[0] // cover, stored[1] // cover)  # Pillow's draft() picks it the same way
    scale = max(scale for scale in CV2_REDUCED_FLAGS if scale <= max(factor, 1))
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), getattr(cv2, CV2_REDUCED_FLAGS[scale]))
    if bgr is None:  # Pillow raises OSError on the same truncated or corrupt files
        raise OSError("image file is truncated or corrupt (OpenCV could not decode it)")
    resized = cv2.resize(bgr, (width, height), interpolation=getattr(cv2, method))
    return _into(out, cv2.cvtColor(resized, cv2.COLOR_BGR2RGB, dst=out))


def _cv2_resize(rgb: Image.Image, width: int, height: int, method: str,
                out: np.ndarray | None = None) -> np.ndarray:
    """v2, and v3 for all but colour JPEGs: box-reduce by an integer factor while both sides stay
    at least the target size (large PNGs and the like), then OpenCV's bilinear resize. It does
    not antialias, but after the DCT scaling or the box reduction no step is 2x or more, so it
    does not alias much."""
    import cv2  # only models of this version need OpenCV

    factor = min(rgb.width // width, rgb.height // height)
    if factor >= 2:
        rgb = rgb.reduce(factor)
    return _into(out, cv2.resize(np.asarray(rgb, dtype=np.uint8), (width, height), dst=out,
                                 interpolation=getattr(cv2, method)))


def _keras_load_img(image: Image.Image, width: int, height: int, resample) -> np.ndarray:
    """``keras.utils.load_img(color_mode="rgb", target_size=..., interpolation=...)`` followed
    by ``img_to_array``, step for step (keras/src/utils/image_utils.py)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), resample)
    return np.asarray(image, dtype=np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, compositing transparency over white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        gray = np.clip(values / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")
