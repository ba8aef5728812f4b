"""Decode + resize cost per image of each preprocessing version, on the same files, one core.

    .venv/bin/python bench/pixels.py [--images 'DIR/*.jpg'] [--count 2000] [--size 224] [--rounds 3]

Without ``--images`` it generates photo-like JPEGs like ``bench/throughput.py`` (300-500 px
sides, quality 90, as the Kaggle test set). Reads every file into memory first, then times
``decode_and_resize`` per version in alternating rounds and prints ms per image and the ratio
to ``pillow-rgb-draft-v1`` (the default).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.throughput import generate  # noqa: E402
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", help="glob of images (default: generated photo-like JPEGs)")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", default="bench_output")
    args = parser.parse_args(argv)
    paths = (sorted(glob.glob(args.images)) if args.images
             else generate(os.path.join(args.work, f"images-{args.count}"), args.count))[:args.count]
    datas = [open(path, "rb").read() for path in paths]
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
