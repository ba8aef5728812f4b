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
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.throughput import generate, link_subset, run_mode  # noqa: E402
from serving import preprocessing  # noqa: E402
from serving.preprocessing import CV2_JPEG, PILLOW_DRAFT_CV2, PILLOW_DRAFT_V1, decode_and_resize  # noqa: E402


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
    """Milliseconds per image, per round, of each variant (module docstring)."""
    from serving.metadata import read_metadata

    metadata = read_metadata(args.model_dir)
    size, version = tuple(metadata.input_size), metadata.preprocessing
    check = preprocessing.check_jpeg_scans
    folder = link_subset(paths, os.path.join(args.work, "bounds-images"))
    stages = ["decode-stage"] + (["decode-stage@before"] if args.baseline_repo else [])
    times = {"scan check": [], "no scan check": [], **{stage: [] for stage in stages}}
    for _ in range(args.rounds):
        for variant in ("scan check", "no scan check"):
            preprocessing.check_jpeg_scans = check if variant == "scan check" else lambda data, limit: None
            started = time.perf_counter()
            for data in datas:
                decode_and_resize(data, size, metadata.resize_method, preprocessing=version)
            times[variant].append((time.perf_counter() - started) / len(datas) * 1e3)
        preprocessing.check_jpeg_scans = check
        for stage in stages:
            times[stage].append(run_mode(stage, folder, args)["seconds"] / len(paths) * 1e3)
    return times


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
              f"alternating, ms per image (decode-stage: wall time over its pool of {os.cpu_count()} cores)")
        for variant, rounds in times.items():
            print(f"{variant:20s} median {sorted(rounds)[len(rounds) // 2]:.3f}  (rounds: "
                  f"{', '.join(f'{s:.3f}' for s in rounds)})")
        for new, old in (("scan check", "no scan check"), ("decode-stage", "decode-stage@before")):
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
