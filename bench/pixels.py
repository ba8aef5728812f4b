"""Decode + resize cost per image of each preprocessing version, on the same files, one core.

    .venv/bin/python bench/pixels.py [--images 'DIR/*.jpg'] [--count 2000] [--size 224] [--rounds 3]
    .venv/bin/python bench/pixels.py --bounds --model-dir DIR [--baseline-repo CHECKOUT] [...]

Without ``--images`` it generates photo-like JPEGs like ``bench/throughput.py`` (300-500 px
sides, quality 90, as the Kaggle test set). Reads every file into memory first, then times
``decode_and_resize`` per version in alternating rounds and prints ms per image and the ratio
to ``pillow-rgb-draft-v1`` (the default).

``--bounds``: what the per-image bounds cost on ordinary images (docs/inputs.md), in one run,
every round alternating: ``decode_and_resize`` of the model's preprocessing with the JPEG scan
check and without it (one core, in memory); and the decode stage (``bench/throughput.py``'s
``decode-stage`` mode: reading, decoding on the stage's thread pool with its time limit) of
this code and, with ``--baseline-repo``, of a checkout from before the bounds, each in its own
process.
"""

from __future__ import annotations

import argparse
import glob
import io
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.throughput import generate, link_subset, run_mode  # noqa: E402
from serving import preprocessing  # noqa: E402
from serving.preprocessing import CV2_JPEG, PILLOW_DRAFT_CV2, PILLOW_DRAFT_V1, decode_and_resize  # noqa: E402

CHUNK = 50  # --bounds: images decoded with one variant before switching to the other


def time_versions(datas: list[bytes], size: tuple[int, int], rounds: int) -> dict[str, list[float]]:
    """Milliseconds per image of each version, per round; versions alternate within a round."""
    times = {PILLOW_DRAFT_V1: [], PILLOW_DRAFT_CV2: [], CV2_JPEG: []}
    for _ in range(rounds):
        for version, seconds in times.items():
            started = time.perf_counter()
            for data in datas:
                decode_and_resize(data, size, preprocessing=version)
            seconds.append((time.perf_counter() - started) / len(datas) * 1e3)
    return times


def time_bounds(datas: list[bytes], paths: list[str], args) -> dict[str, list[float]]:
    """Milliseconds per image, per round, of each variant (module docstring), on the images as
    they are and on the same images re-encoded as progressive JPEGs (Pillow, quality 90: the
    scan check reads only those). Decoding with and without the scan check alternates every
    ``CHUNK`` images (the order switching each time), so that a busy machine's changing load
    falls on both; the check is also timed alone."""
    from serving.metadata import read_metadata

    metadata = read_metadata(args.model_dir)
    size, version = tuple(metadata.input_size), metadata.preprocessing
    check = preprocessing.check_jpeg_scans
    variants = {"scan check": check, "no scan check": lambda data, limit: None}
    sets = {"as they are": datas, "progressive": [progressive(data) for data in datas]}
    folder = link_subset(paths, os.path.join(args.work, "bounds-images"))
    stages = ["decode-stage"] + (["decode-stage@before"] if args.baseline_repo else [])
    times = {**{f"{name}, {images}": [] for images in sets for name in ("scan check alone", *variants)},
             **{f"{stage} {clock}": [] for stage in stages for clock in ("wall", "CPU")}}
    for _ in range(args.rounds):
        for images, data_set in sets.items():
            started = time.perf_counter()
            for data in data_set:
                check(data, preprocessing.DEFAULT_MAX_JPEG_SCANS)
            times[f"scan check alone, {images}"].append((time.perf_counter() - started) / len(data_set) * 1e3)
            spent = dict.fromkeys(variants, 0.0)
            for chunk, start in enumerate(range(0, len(data_set), CHUNK)):
                for name in sorted(variants, reverse=chunk % 2 == 1):
                    preprocessing.check_jpeg_scans = variants[name]
                    started = time.perf_counter()
                    for data in data_set[start:start + CHUNK]:
                        decode_and_resize(data, size, metadata.resize_method, preprocessing=version)
                    spent[name] += time.perf_counter() - started
            preprocessing.check_jpeg_scans = check
            for name, seconds in spent.items():
                times[f"{name}, {images}"].append(seconds / len(data_set) * 1e3)
        for stage in stages:
            result = run_mode(stage, folder, args)
            times[f"{stage} wall"].append(result["seconds"] / len(paths) * 1e3)
            times[f"{stage} CPU"].append(result["work_cpu_seconds"] / len(paths) * 1e3)
    return times


def progressive(data: bytes) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buffer, format="JPEG", quality=90, progressive=True)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", help="glob of images (default: generated photo-like JPEGs)")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", default="bench_output")
    parser.add_argument("--bounds", action="store_true", help="the cost of the per-image bounds")
    parser.add_argument("--model-dir", help="--bounds: the model whose size and preprocessing to decode to")
    parser.add_argument("--baseline-repo", help="--bounds: a checkout from before the bounds")
    args = parser.parse_args(argv)
    paths = (sorted(glob.glob(args.images)) if args.images
             else generate(os.path.join(args.work, f"images-{args.count}"), args.count))[:args.count]
    datas = [open(path, "rb").read() for path in paths]
    if args.bounds:
        times = time_bounds(datas, paths, args)
        print(f"{len(datas)} images ({args.images or 'generated 300-500 px JPEGs'}), {args.rounds} rounds "
              f"alternating, ms per image (decode-stage: its pool on {os.cpu_count()} cores; wall time, and "
              "the CPU time of every thread)")
        for variant, rounds in times.items():
            print(f"{variant:36s} median {sorted(rounds)[len(rounds) // 2]:.3f}  (rounds: "
                  f"{', '.join(f'{s:.3f}' for s in rounds)})")
        for new, old in (("scan check, as they are", "no scan check, as they are"),
                         ("scan check, progressive", "no scan check, progressive"),
                         ("decode-stage wall", "decode-stage@before wall"),
                         ("decode-stage CPU", "decode-stage@before CPU")):
            if times.get(old):
                ratios = sorted(a / b for a, b in zip(times[new], times[old], strict=True))
                print(f"{new} / {old}: median {ratios[len(ratios) // 2]:.3f} (per round: "
                      f"{', '.join(f'{r:.3f}' for r in ratios)})")
        return 0
    times = time_versions(datas, (args.size, args.size), args.rounds)
    baseline = min(times[PILLOW_DRAFT_V1])
    print(f"{len(datas)} images ({args.images or 'generated 300-500 px JPEGs'}), {args.size} px, "
          f"best of {args.rounds} rounds")
    for version, seconds in times.items():
        print(f"{version:22s} {min(seconds):.3f} ms/image  (rounds: "
              f"{', '.join(f'{s:.3f}' for s in seconds)})  {baseline / min(seconds):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
