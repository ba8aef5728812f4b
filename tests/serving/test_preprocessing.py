import gzip
import io
import zipfile

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError, features

from serving.preprocessing import (
    CV2_JPEG,
    EXIF_ORIENTATION,
    KERAS_LOAD_IMG,
    PILLOW_DRAFT_CV2,
    PILLOW_DRAFT_V1,
    PILLOW_FIT,
    EmptyImageError,
    ImageTooLargeError,
    TooManyScansError,
    decode_and_resize,
    describe_bytes,
    jpeg_scan_count,
)
from tests.corpus import GOOD, many_scan_jpeg, write_corpus


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture(params=[PILLOW_DRAFT_V1, PILLOW_DRAFT_CV2, CV2_JPEG])
def version(request) -> str:
    """petscore's loaders keep one contract: every format and fault behaves the same in each."""
    return request.param


def halves(left=(255, 0, 0), right=(0, 0, 255), size=(40, 20)) -> Image.Image:
    """Left half one colour, right half another: orientation is easy to see."""
    image = Image.new("RGB", size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


def test_every_good_corpus_file_decodes_to_rgb_uint8_of_the_target_size(tmp_path, version):
    expected = write_corpus(str(tmp_path))
    for name, outcome in expected.items():
        data = (tmp_path / name).read_bytes()
        if outcome == GOOD:
            pixels = decode_and_resize(data, (24, 32), preprocessing=version)
            assert pixels.shape == (24, 32, 3) and pixels.dtype == np.uint8, name
        else:
            with pytest.raises(Exception) as raised:
                decode_and_resize(data, (24, 32), preprocessing=version)
            assert type(raised.value).__name__ == outcome[1], name


@pytest.mark.parametrize("loader", [PILLOW_DRAFT_V1, PILLOW_DRAFT_CV2, CV2_JPEG, KERAS_LOAD_IMG, PILLOW_FIT])
def test_decoding_into_a_batch_row_gives_the_same_pixels_and_writes_only_that_row(tmp_path, loader):
    """The decoder writes each image straight into its row of the batch's array (``out``)."""
    expected = write_corpus(str(tmp_path))
    good = [name for name, outcome in expected.items() if outcome == GOOD]
    batch = np.full((len(good) + 1, 24, 32, 3), 7, np.uint8)
    for row, name in enumerate(good):
        data = (tmp_path / name).read_bytes()
        written = decode_and_resize(data, (24, 32), preprocessing=loader, out=batch[row])
        assert np.shares_memory(written, batch[row]), name
        np.testing.assert_array_equal(batch[row], decode_and_resize(data, (24, 32), preprocessing=loader))
    assert (batch[-1] == 7).all()  # the row after the last image is untouched


def test_exif_orientation_is_applied(version):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated 90 degrees clockwise
    data = encode(halves(), "PNG", exif=exif)
    pixels = decode_and_resize(data, (20, 20), preprocessing=version).astype(int)
    # After a clockwise turn the red left half is on top and the blue right half at the bottom.
    assert pixels[2, 10, 0] > 200 and pixels[2, 10, 2] < 60
    assert pixels[17, 10, 2] > 200 and pixels[17, 10, 0] < 60


def quadrants(size=(48, 32)) -> Image.Image:
    """Four colours, one per quadrant: every EXIF orientation puts them somewhere else."""
    image = Image.new("RGB", size)
    width, height = size
    for colour, box in (((230, 20, 20), (0, 0, width // 2, height // 2)),
                        ((20, 230, 20), (width // 2, 0, width, height // 2)),
                        ((20, 20, 230), (0, height // 2, width // 2, height)),
                        ((230, 230, 20), (width // 2, height // 2, width, height))):
        image.paste(colour, box)
    return image


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_of_a_jpeg_is_applied_as_pillow_applies_it(version, orientation):
    """v3 decodes colour JPEGs with OpenCV, which applies the orientation itself: it must turn the
    image exactly as Pillow's ``exif_transpose`` does, at full and at reduced DCT scale."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    for size, target in (((48, 32), (16, 16)), ((480, 320), (64, 64))):
        data = encode(quadrants(size), "JPEG", exif=exif, quality=95)
        expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
        expected = np.asarray(expected.resize((16, 16), Image.Resampling.BOX)).astype(int)
        pixels = decode_and_resize(data, target, preprocessing=version)
        pixels = np.asarray(Image.fromarray(pixels).resize((16, 16), Image.Resampling.BOX)).astype(int)
        for row, column in ((3, 3), (3, 12), (12, 3), (12, 12)):  # quadrant centres
            assert np.abs(pixels[row, column] - expected[row, column]).max() < 30, (size, row, column)


def test_v3_decodes_a_colour_jpeg_to_the_pixels_pillow_decodes():
    """OpenCV and Pillow both run libjpeg-turbo: at the image's own size (no resize) v3 and v1
    agree to the bit, progressive or baseline, so v3's only change is the resize."""
    photo = Image.fromarray(np.random.default_rng(2).integers(0, 255, (12, 16, 3), dtype=np.uint8))
    photo = photo.resize((160, 120), Image.Resampling.BICUBIC)
    for options in ({"quality": 90}, {"quality": 75, "progressive": True}):
        data = encode(photo, "JPEG", **options)
        np.testing.assert_array_equal(decode_and_resize(data, (120, 160), preprocessing=CV2_JPEG),
                                      decode_and_resize(data, (120, 160), preprocessing=PILLOW_DRAFT_V1))


def test_a_multi_picture_jpeg_gives_its_first_picture(version):
    """Phones write MPO files (a JPEG followed by more pictures): every loader uses the first."""
    photo = Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 40, 3), dtype=np.uint8))
    first, second = photo.resize((400, 300)), photo.resize((400, 300)).transpose(Image.Transpose.ROTATE_180)
    mpo = io.BytesIO()
    first.save(mpo, format="MPO", save_all=True, append_images=[second], quality=90)
    assert Image.open(io.BytesIO(mpo.getvalue())).format == "MPO"
    pixels = decode_and_resize(mpo.getvalue(), (64, 64), preprocessing=version)
    np.testing.assert_array_equal(pixels, decode_and_resize(encode(first, "JPEG", quality=90), (64, 64),
                                                            preprocessing=version))


def test_without_exif_the_image_is_not_rotated(version):
    pixels = decode_and_resize(encode(halves(), "PNG"), (20, 20), preprocessing=version).astype(int)
    assert pixels[10, 2, 0] > 200 and pixels[10, 17, 2] > 200


def test_transparent_pixels_become_white_and_opaque_pixels_keep_their_colour(version):
    image = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    image.paste((0, 128, 0, 255), (0, 0, 5, 10))
    pixels = decode_and_resize(encode(image, "PNG"), (10, 10), resize_method="bilinear",
                               preprocessing=version)
    assert tuple(pixels[5, 1]) == (0, 128, 0)
    assert tuple(pixels[5, 8]) == (255, 255, 255)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(version):
    values = np.full((8, 8), 32768, dtype=np.uint16)
    values[:, 4:] = 65535
    pixels = decode_and_resize(encode(Image.fromarray(values), "PNG"), (8, 8), preprocessing=version)
    assert tuple(pixels[4, 0]) == (128, 128, 128)
    assert tuple(pixels[4, 7]) == (255, 255, 255)


def test_cmyk_jpeg_becomes_rgb_of_the_same_colour(version):
    red = Image.new("RGB", (16, 16), (220, 30, 30))
    data = encode(red.convert("CMYK"), "JPEG", quality=95)
    pixels = decode_and_resize(data, (8, 8), preprocessing=version).astype(int)
    assert np.abs(pixels[4, 4] - np.array([220, 30, 30])).max() < 25


def test_first_frame_of_an_animation_is_used(version):
    frames = [Image.new("RGB", (8, 8), colour).convert("P") for colour in ((255, 0, 0), (0, 0, 255))]
    data = io.BytesIO()
    frames[0].save(data, format="GIF", save_all=True, append_images=frames[1:])
    pixels = decode_and_resize(data.getvalue(), (8, 8), preprocessing=version).astype(int)
    assert pixels[4, 4, 0] > 200 and pixels[4, 4, 2] < 50


@pytest.mark.parametrize(("version", "tolerance"),
                         [(PILLOW_DRAFT_V1, 4.0), (PILLOW_DRAFT_CV2, 8.0), (CV2_JPEG, 4.0)])
def test_jpeg_reduced_scale_decode_stays_close_to_full_decode(version, tolerance):
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    photo = photo.resize((800, 800), Image.Resampling.BICUBIC)
    data = encode(photo, "JPEG", quality=92)
    fast = decode_and_resize(data, (64, 64), preprocessing=version).astype(float)
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize(
        (64, 64), Image.Resampling.BILINEAR)).astype(float)
    assert np.abs(fast - full).mean() < tolerance


def test_pixel_cap_is_enforced_from_the_header(version):
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(ImageTooLargeError, match="10000 pixels exceeds the cap of 9999"):
        decode_and_resize(data, (8, 8), max_pixels=9_999, preprocessing=version)
    assert decode_and_resize(data, (8, 8), max_pixels=10_000, preprocessing=version).shape == (8, 8, 3)


@pytest.mark.parametrize("loader", [PILLOW_DRAFT_V1, PILLOW_DRAFT_CV2, CV2_JPEG, KERAS_LOAD_IMG, PILLOW_FIT])
def test_a_jpeg_of_more_scans_than_the_limit_is_refused_before_decoding(loader, monkeypatch):
    data = many_scan_jpeg(300)
    with pytest.raises(TooManyScansError, match=r"^a JPEG of 300 scans exceeds the limit of 100 scans per "
                       r"image: .* \(--max-jpeg-scans raises the limit\)$"):
        decode_and_resize(data, (8, 8), preprocessing=loader)
    assert decode_and_resize(data, (8, 8), preprocessing=loader, max_jpeg_scans=300).shape == (8, 8, 3)
    def decoded(*args):
        pytest.fail("decoded before the scan check")

    monkeypatch.setattr(ImageFile.ImageFile, "load", decoded)
    monkeypatch.setattr("cv2.imdecode", decoded)
    with pytest.raises(TooManyScansError):
        decode_and_resize(data, (8, 8), preprocessing=loader, max_jpeg_scans=299)


def test_scans_are_counted_as_libjpeg_reads_them():
    """Baseline 1, progressive 10 (6 in gray), as Pillow writes them; a comment full of 0xFF 0xDA
    bytes is a segment, not scans, and a second picture after the first's end (a phone's MPO)
    is not the image decoded."""
    photo = Image.fromarray(np.random.default_rng(2).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    assert jpeg_scan_count(encode(photo, "JPEG")) == 1
    assert jpeg_scan_count(encode(photo, "JPEG", progressive=True)) == 10
    assert jpeg_scan_count(encode(photo.convert("L"), "JPEG", progressive=True)) == 6
    commented = encode(photo, "JPEG", progressive=True, comment=b"\xff\xda" * 200)
    assert commented.count(b"\xff\xda") == 210 and jpeg_scan_count(commented) == 10
    assert decode_and_resize(commented, (8, 8), max_jpeg_scans=10).shape == (8, 8, 3)
    followed = encode(photo, "JPEG", progressive=True) + many_scan_jpeg(300)
    assert jpeg_scan_count(followed) == 10
    assert decode_and_resize(followed, (8, 8), max_jpeg_scans=10).shape == (8, 8, 3)
    assert jpeg_scan_count(many_scan_jpeg(1234)) == 1234


def test_a_baseline_jpeg_is_not_held_to_the_scan_limit():
    """A baseline decoder stops once the image is whole: scans after it cost nothing (TurboJPEG's
    own scan limit is for progressive JPEGs too)."""
    data = encode(Image.new("RGB", (64, 48), (200, 30, 30)), "JPEG")
    last_scan, end = data.rindex(b"\xff\xda"), data.rindex(b"\xff\xd9")
    repeated = data[:end] + data[last_scan:end] * 300 + data[end:]
    assert jpeg_scan_count(repeated) == 301
    pixels = decode_and_resize(repeated, (8, 8), preprocessing=CV2_JPEG)
    np.testing.assert_array_equal(pixels, decode_and_resize(data, (8, 8), preprocessing=CV2_JPEG))


def test_empty_and_unknown_inputs_are_refused(version):
    with pytest.raises(EmptyImageError):
        decode_and_resize(b"", (8, 8), preprocessing=version)
    with pytest.raises(ValueError, match="unknown resize method"):
        decode_and_resize(encode(Image.new("RGB", (4, 4)), "PNG"), (8, 8), resize_method="magic",
                          preprocessing=version)


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear", "bicubic", "box", "hamming", "lanczos"])
def test_keras_loader_gives_keras_load_img_pixels_to_the_bit(tmp_path, interpolation):
    """Every good file of the corpus (CMYK, palette, transparency, 16-bit, EXIF, animation...)
    as keras.utils.load_img + img_to_array see it; the faults fail as with petscore's loader."""
    import keras

    expected = write_corpus(str(tmp_path))
    for name, outcome in expected.items():
        data = (tmp_path / name).read_bytes()
        if outcome != GOOD:
            with pytest.raises(Exception) as raised:
                decode_and_resize(data, (24, 32), interpolation, preprocessing=KERAS_LOAD_IMG)
            assert type(raised.value).__name__ == outcome[1], name
            continue
        got = decode_and_resize(data, (24, 32), interpolation, preprocessing=KERAS_LOAD_IMG)
        want = keras.utils.img_to_array(keras.utils.load_img(
            str(tmp_path / name), target_size=(24, 32), interpolation=interpolation))
        assert got.dtype == np.uint8 and np.array_equal(got.astype(np.float32), want), name


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear", "bicubic", "box", "hamming", "lanczos"])
def test_the_teachable_machine_loader_gives_its_samples_pixels_to_the_bit(interpolation):
    """Teachable Machine's Python sample: Image.open(path).convert("RGB"), then ImageOps.fit
    (the largest centred crop of the target's aspect ratio, resized), EXIF not applied."""
    method = getattr(Image.Resampling, interpolation.upper())
    for photo in (smooth((90, 40)), smooth((30, 70)).convert("P"), quadrants()):
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = 6
        data = encode(photo.convert("RGB"), "JPEG", quality=90, exif=exif.tobytes())
        want = np.asarray(ImageOps.fit(Image.open(io.BytesIO(data)).convert("RGB"), (32, 24), method))
        got = decode_and_resize(data, (24, 32), resize_method=interpolation, preprocessing=PILLOW_FIT)
        np.testing.assert_array_equal(got, want)


def test_keras_loader_ignores_exif_orientation_as_keras_does():
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(halves(), "PNG", exif=exif)
    pixels = decode_and_resize(data, (20, 20), "nearest", preprocessing=KERAS_LOAD_IMG).astype(int)
    assert pixels[10, 2, 0] > 200 and pixels[10, 17, 2] > 200  # red left, blue right: not rotated


def test_keras_loader_keeps_the_pixel_cap_and_refuses_unknown_versions():
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(ImageTooLargeError):
        decode_and_resize(data, (8, 8), "nearest", max_pixels=9_999, preprocessing=KERAS_LOAD_IMG)
    with pytest.raises(ValueError, match="unknown resize method 'nearest' for pillow-rgb-draft-v1"):
        decode_and_resize(data, (8, 8), "nearest")
    with pytest.raises(ValueError, match="unknown preprocessing 'tf-v9'"):
        decode_and_resize(data, (8, 8), preprocessing="tf-v9")


def smooth(size=(64, 48)) -> Image.Image:
    """Gradients in three channels: every loader's resize has colours to get right."""
    y, x = np.mgrid[0:size[1], 0:size[0]]
    return Image.fromarray(np.stack([x * 3, y * 5, (x + y) * 2], -1).astype(np.uint8))


@pytest.mark.parametrize("version", [PILLOW_DRAFT_V1, PILLOW_DRAFT_CV2, CV2_JPEG, KERAS_LOAD_IMG, PILLOW_FIT])
@pytest.mark.parametrize("orientation", [1, 6])
def test_a_phones_heic_decodes_as_the_same_photo_in_png_in_every_loader(version, orientation):
    """A HEIC written by pillow-heif, lossless, with the EXIF orientation a phone held sideways
    writes (pillow-heif stores it as the file's rotation, as phones do): every loader gives the
    pixels it gives for the upright photo as a PNG, to the bit."""
    photo = smooth()
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    heic = encode(photo, "HEIF", quality=-1, chroma=444, matrix_coefficients=0, exif=exif.tobytes())
    assert describe_bytes(heic) == "a HEIF/HEIC image"
    upright = encode(photo.transpose(Image.Transpose.ROTATE_270) if orientation == 6 else photo, "PNG")
    for size in ((24, 32), (64, 48)):
        got = decode_and_resize(heic, size, preprocessing=version, resize_method="bilinear")
        want = decode_and_resize(upright, size, preprocessing=version, resize_method="bilinear")
        np.testing.assert_array_equal(got, want)


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow has no AVIF codec")
def test_an_avif_decodes_close_to_the_same_photo_in_png(version):
    photo = smooth()
    avif = encode(photo, "AVIF", quality=100, subsampling="4:4:4")
    assert describe_bytes(avif) == "an AVIF image"
    got = decode_and_resize(avif, (24, 32), preprocessing=version).astype(int)
    want = decode_and_resize(encode(photo, "PNG"), (24, 32), preprocessing=version).astype(int)
    assert np.abs(got - want).max() <= 4  # AVIF at quality 100 is near-lossless, not lossless


def zipped() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("photos/1.jpg", b"x")
    return buffer.getvalue()


HEIC_HEADER = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic"
NOT_IMAGES = {  # bytes people feed an image scorer, and what the error must say they are
    "pdf": (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj", "not an image: a PDF document"),
    "html": (b"\n  <!DOCTYPE html>\n<html><head><title>404 Not Found",
             "not an image: an HTML page (a web page saved as an image, or an error page downloaded "
             "instead)"),
    "svg": (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="8"/>',
            "not an image: an SVG drawing (vector graphics: rasterise it first)"),
    "xml": (b'<?xml version="1.0"?><annotation><object>cat</object></annotation>',
            "not an image: an XML document"),
    "zip": (zipped(), "not an image: a ZIP archive (or a file in one: .docx, .xlsx, .epub)"),
    "gzip": (gzip.compress(b"a photo, compressed"), "not an image: GZIP-compressed data"),
    "text": ("\ufeffid,label\n1,0.5\n".encode(), "not an image: text (first line 'id,label')"),
    "mp4": (b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00isomiso2avc1mp41" + bytes(32),
            "not an image: an MP4 video"),
    "mov": (b"\x00\x00\x00\x14ftypqt  \x00\x00\x00\x00qt  " + bytes(32),
            "not an image: a QuickTime (MOV) video"),
    "webm": (b"\x1aE\xdf\xa3\x9fB\x86\x81\x01" + bytes(32), "not an image: a Matroska/WebM video"),
    "binary": (bytes([0, 1, 2, 3, 250, 251, 252, 253]) * 8,
               "not an image: unrecognised binary data (first bytes 00 01 02 03 fa fb fc fd)"),
    "broken heic": (HEIC_HEADER + bytes(40), "a HEIF/HEIC image that cannot be read: truncated or "
                                             "corrupt, or an encoding no installed codec decodes"),
    "broken png": (b"\x89PNG\r\n\x1a\n" + bytes(8), "a PNG image that cannot be read: truncated"),
}


@pytest.mark.parametrize("kind", sorted(NOT_IMAGES))
def test_bytes_that_are_not_an_image_are_named_in_the_error(version, kind):
    data, message = NOT_IMAGES[kind]
    with pytest.raises(UnidentifiedImageError) as raised:
        decode_and_resize(data, (8, 8), preprocessing=version)
    assert str(raised.value).startswith(message)
    assert "0x" not in str(raised.value) and "BytesIO" not in str(raised.value)
