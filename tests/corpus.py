"""Image files made by the tests: good images in every supported format and bad files of every
kind a nightly run meets. Each entry says what the pipeline must do with it."""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
from PIL import Image

from model.synthetic import synthetic_pet
from serving.preprocessing import jpeg_scan_count

# name -> expected outcome: "prediction", or the error row's (stage, error_type)
GOOD = "prediction"


def _jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **kwargs)
    return buffer.getvalue()


def many_scan_jpeg(scans: int, size: tuple[int, int] = (64, 48)) -> bytes:
    """A progressive JPEG of ``scans`` scans: Pillow's (10 scans) with its last scan repeated
    before the end-of-image marker, as the files of libjpeg-turbo#284 repeat scans. Decoders
    accept it (warning of an inconsistent progression) and spend a pass over the image per scan."""
    data = _jpeg_bytes(synthetic_pet("cat", 3, size), progressive=True)
    last_scan, end = data.rindex(b"\xff\xda"), data.rindex(b"\xff\xd9")
    return data[:end] + data[last_scan:end] * (scans - jpeg_scan_count(data)) + data[end:]


def _png_with_declared_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR is rewritten to claim ``width`` x ``height`` pixels."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr) & 0xFFFFFFFF)
    return bytes(data)


def write_corpus(root: str) -> dict[str, object]:
    """Write the corpus under ``root``; return ``{file name: expected outcome}``.

    Integer-named files are Kaggle test images; the others test formats and faults.
    """
    os.makedirs(root, exist_ok=True)
    expected: dict[str, object] = {}

    def put(name: str, data: bytes, outcome: object) -> None:
        with open(os.path.join(root, name), "wb") as handle:
            handle.write(data)
        expected[name] = outcome

    for image_id in range(1, 13):
        cls = ("cat", "dog")[image_id % 2]
        put(f"{image_id}.jpg", _jpeg_bytes(synthetic_pet(cls, image_id, (60 + image_id, 80))), GOOD)
    pet = synthetic_pet("dog", 99, (64, 48))
    png = io.BytesIO()
    pet.convert("RGBA").save(png, format="PNG")
    put("13.png", png.getvalue(), GOOD)
    put("14.jpg", _jpeg_bytes(pet.convert("L")), GOOD)  # grayscale
    put("png_bytes_named.jpg", png.getvalue(), GOOD)  # content decides, not the name
    put("cmyk.jpg", _jpeg_bytes(pet.convert("CMYK")), GOOD)
    sixteen = io.BytesIO()
    Image.fromarray(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20).save(sixteen, format="PNG")
    put("sixteen_bit.png", sixteen.getvalue(), GOOD)
    gif = io.BytesIO()
    frames = [synthetic_pet("cat", i, (40, 40)).convert("P") for i in range(3)]
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    put("animated.gif", gif.getvalue(), GOOD)
    bmp, webp = io.BytesIO(), io.BytesIO()
    pet.save(bmp, format="BMP")
    pet.save(webp, format="WEBP")
    put("bitmap.bmp", bmp.getvalue(), GOOD)
    put("photo.webp", webp.getvalue(), GOOD)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    put("rotated.jpg", _jpeg_bytes(pet, exif=exif), GOOD)
    put("very_wide.jpg", _jpeg_bytes(synthetic_pet("cat", 5, (4, 2000))), GOOD)

    whole = _jpeg_bytes(synthetic_pet("cat", 7, (80, 80)))
    put("0.jpg", b"", ("decode", "EmptyImageError"))
    put("truncated.jpg", whole[: len(whole) // 2], ("decode", "OSError"))
    put("not_an_image.jpg", b"this is a text file, not a JPEG\n" * 4, ("decode", "UnidentifiedImageError"))
    put("bomb.png", _png_with_declared_size(100_000, 100_000), ("decode", "ImageTooLargeError"))
    return expected
