"""Generated images with visually separable classes, for tests, the offline demo and benchmarks.

'cat' images are warm-toned with round blobs, 'dog' images cool-toned with bars, on a textured
background tinted the same way, so that JPEG sizes and decode costs look like photos. They are
*not* cats and dogs: a model trained on them proves the plumbing, not real-world accuracy.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw

CLASS_NAMES = ("cat", "dog")
_BACKGROUNDS = {"cat": (150, 115, 90), "dog": (90, 115, 150)}
_PALETTES = {"cat": ((200, 255), (60, 140), (0, 60)), "dog": ((0, 60), (60, 140), (200, 255))}


def synthetic_pet(class_name: str, seed: int, size: tuple[int, int] = (96, 96)) -> Image.Image:
    """One RGB image of ``size`` = (height, width) for ``class_name`` ('cat' or 'dog')."""
    rng = np.random.default_rng([seed, CLASS_NAMES.index(class_name)])
    height, width = size
    texture = rng.normal(_BACKGROUNDS[class_name], 30, size=(max(height // 8, 1), max(width // 8, 1), 3))
    background = Image.fromarray(np.clip(texture, 0, 255).astype(np.uint8)).resize(
        (width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(background)
    for _ in range(int(rng.integers(3, 7))):
        colour = tuple(int(rng.integers(lo, hi)) for lo, hi in _PALETTES[class_name])
        x0, y0 = int(rng.integers(0, width * 3 // 4)), int(rng.integers(0, height * 3 // 4))
        w, h = int(rng.integers(width // 5, width // 2)), int(rng.integers(height // 5, height // 2))
        if class_name == "cat":
            draw.ellipse((x0, y0, x0 + w, y0 + w * height // width), fill=colour)
        else:
            draw.rectangle((x0, y0, x0 + w, y0 + h // 3), fill=colour)
    return background


def write_labelled_folders(root: str, per_class: int, size=(96, 96), seed: int = 0) -> list[str]:
    """Write ``root/{cat,dog}/<class>.<i>.jpg``; return the paths."""
    paths = []
    for class_name in CLASS_NAMES:
        os.makedirs(os.path.join(root, class_name), exist_ok=True)
        for i in range(per_class):
            path = os.path.join(root, class_name, f"{class_name}.{i + 1}.jpg")
            synthetic_pet(class_name, seed * 100_003 + i, size).save(path, quality=90)
            paths.append(path)
    return paths


def write_kaggle_test_folder(
    root: str, count: int, seed: int = 0, side_range: tuple[int, int] = (96, 96), quality: int = 90
) -> dict[int, str]:
    """Write ``root/<id>.jpg`` for ids 1..count, classes alternating; return ``{id: class}``."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    truth = {}
    for image_id in range(1, count + 1):
        class_name = CLASS_NAMES[image_id % 2]
        size = tuple(int(v) for v in rng.integers(side_range[0], side_range[1] + 1, size=2))
        synthetic_pet(class_name, seed * 100_003 + image_id, size).save(
            os.path.join(root, f"{image_id}.jpg"), quality=quality)
        truth[image_id] = class_name
    return truth


def main(argv: list[str] | None = None) -> int:
    """``python -m model.synthetic``: write generated training folders and/or a test folder."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m model.synthetic", description=__doc__)
    parser.add_argument("--folders", help="Write <folders>/{cat,dog}/*.jpg training images here.")
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--test", help="Write Kaggle-style <test>/<id>.jpg images here.")
    parser.add_argument("--test-count", type=int, default=200)
    parser.add_argument("--min-side", type=int, default=96)
    parser.add_argument("--max-side", type=int, default=160)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.folders:
        paths = write_labelled_folders(args.folders, args.per_class, (args.min_side, args.min_side),
                                       args.seed)
        print(f"wrote {len(paths)} labelled images under {args.folders}")
    if args.test:
        truth = write_kaggle_test_folder(args.test, args.test_count, args.seed + 1,
                                         (args.min_side, args.max_side), args.quality)
        print(f"wrote {len(truth)} test images under {args.test}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
