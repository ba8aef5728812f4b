"""Phone photos, non-images and a spreadsheet's manifest through the real CLI, on real photos.

Converts the first --count photos of a folder to HEIC (pillow-heif) and AVIF (Pillow), writes a
manifest as Excel's "CSV UTF-8" saves one (a byte-order mark, CRLF line ends) listing the JPEGs,
their HEIC and AVIF copies and a few files that are not images (PDF, HTML page, ZIP, text, MP4),
scores it with ``python -m pipeline.score`` in a subprocess whose TF_CPP_MIN_LOG_LEVEL is unset,
and prints as JSON: the exit code, TensorFlow/absl log lines on its stderr, inputs, predictions
and errors, each error's message, the median time to decode one file of each format with the
model's loader, and how far each HEIC and AVIF copy's probabilities are from its JPEG's
(largest and mean absolute difference, decisions flipped).

    python bench/inputs_check.py --photos ../shared/data/real-photos/test --model-dir DIR \\
        --work /tmp/inputs
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from serving.metadata import read_metadata  # noqa: E402
from serving.preprocessing import decode_and_resize, open_image  # noqa: E402  (registers HEIF)
from serving.tf_logs import ABSL_BANNER, ABSL_LINE  # noqa: E402
from tests.pipeline.outputs import read_run  # noqa: E402

NOT_IMAGES = {
    "scan.pdf": b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n",
    "download.jpg": b"<!DOCTYPE html>\n<html><head><title>403 Forbidden</title></head></html>\n",
    "photos.zip": b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + bytes(40),
    "notes.jpg": b"cat or dog? ask the vet\n",
    "clip.mp4": b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00isomiso2avc1mp41" + bytes(64),
    "photo.jpg.gz": gzip.compress(b"\xff\xd8\xff\xe0" + bytes(64)),
}


def convert(photos: list[str], folder: str, fmt: str, suffix: str) -> tuple[list[str], float]:
    """Each photo re-encoded (quality 90, its EXIF kept); returns the paths and seconds taken."""
    os.makedirs(folder, exist_ok=True)
    started, paths = time.monotonic(), []
    for photo in photos:
        path = os.path.join(folder, os.path.splitext(os.path.basename(photo))[0] + suffix)
        with Image.open(photo) as image:
            image.save(path, format=fmt, quality=90, exif=image.getexif().tobytes())
        paths.append(path)
    return paths, time.monotonic() - started


def decode_ms(paths: list[str], model_dir: str) -> float:
    """Median milliseconds to decode and resize one file with the model's own loader."""
    metadata = read_metadata(model_dir)
    times = []
    for path in paths:
        with open(path, "rb") as handle:
            data = handle.read()
        started = time.perf_counter()
        decode_and_resize(data, (metadata.height, metadata.width), metadata.resize_method,
                          preprocessing=metadata.preprocessing)
        times.append(time.perf_counter() - started)
    return round(1000 * float(np.median(times)), 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", required=True, help="Folder of JPEG photos.")
    parser.add_argument("--model-dir", required=True, help="A packaged or trained model directory.")
    parser.add_argument("--work", required=True)
    parser.add_argument("--count", type=int, default=50, help="Photos converted to HEIC and AVIF.")
    args = parser.parse_args(argv)
    photos = sorted(os.path.join(args.photos, name) for name in os.listdir(args.photos)
                    if name.lower().endswith(".jpg"))
    heic, heic_seconds = convert(photos[:args.count], os.path.join(args.work, "heic"), "HEIF", ".heic")
    avif, avif_seconds = convert(photos[:args.count], os.path.join(args.work, "avif"), "AVIF", ".avif")
    others = []
    for name, data in NOT_IMAGES.items():
        others.append(os.path.join(args.work, "other", name))
        os.makedirs(os.path.dirname(others[-1]), exist_ok=True)
        with open(others[-1], "wb") as handle:
            handle.write(data)
    manifest = os.path.join(args.work, "tonight.csv")
    with open(manifest, "wb") as handle:  # Excel's "CSV UTF-8": a byte-order mark, CRLF
        handle.write(b"\xef\xbb\xbf" + "".join(f"{path}\r\n" for path in photos + heic + avif + others)
                     .encode("utf-8"))
    output = os.path.join(args.work, "out")
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    process = subprocess.run(
        [sys.executable, "-m", "pipeline.score", "--manifest", manifest, "--model-dir", args.model_dir,
         "--output", output, "--overwrite", "--max-error-rate", "1"],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env,
        capture_output=True, timeout=3600)
    stderr = process.stderr.splitlines()
    run = read_run(output)
    rows = {r["path"]: r for r in run["predictions"].to_pylist()}
    classes = [name[len("prob_"):] for name in run["predictions"].column_names if name.startswith("prob_")]

    def against_jpeg(copies: list[str]) -> dict:
        jpeg = np.array([[rows[p][f"prob_{c}"] for c in classes] for p in photos[:args.count]])
        other = np.array([[rows[p][f"prob_{c}"] for c in classes] for p in copies])
        return {"images": len(copies), "max_abs_diff": round(float(np.abs(other - jpeg).max()), 4),
                "mean_abs_diff": round(float(np.abs(other - jpeg).mean()), 4),
                "decisions_flipped": int(np.sum(other.argmax(1) != jpeg.argmax(1)))}

    with open_image(open(heic[0], "rb").read()) as first:
        heic_format = first.format
    print(json.dumps({
        "exit_code": process.returncode,
        "tf_absl_log_lines_on_stderr": sum(bool(ABSL_LINE.match(line)) or line.startswith(ABSL_BANNER)
                                           for line in stderr),
        "litert_info_lines_on_stderr": sum(line.startswith(b"INFO: ") for line in stderr),
        "inputs": run["summary"]["inputs"], "predictions": run["summary"]["predictions"],
        "errors": {os.path.basename(r["path"]): f"{r['error_type']}: {r['message']}"
                   for r in run["errors"].to_pylist()},
        "heic_opened_as": heic_format,
        "heic_encode_seconds_per_photo": round(heic_seconds / args.count, 3),
        "avif_encode_seconds_per_photo": round(avif_seconds / args.count, 3),
        "decode_ms_median": {kind: decode_ms(paths, args.model_dir) for kind, paths in (
            ("jpeg", photos[:args.count]), ("heic", heic), ("avif", avif))},
        "heic_vs_jpeg": against_jpeg(heic), "avif_vs_jpeg": against_jpeg(avif),
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
