"""How well petscore uses a machine: the figures of the batch issue (24), in one run, per model.

    .venv/bin/python bench/batches.py --model alpha025=DIR [--model mobilenet_v2=DIR ...]
        [--images 2000] [--sizes 1000,10000] [--baseline-repo CHECKOUT] [--work bench_output]

Runs on any machine with petscore's scoring dependencies: TensorFlow is needed only for the
tf.data baselines, which are left out where it is not installed (the lent GPU machine; see
docs/performance.md for the recipe there). Each mode runs in its own process on the same
generated JPEGs (``bench/throughput.py``'s modes), from a warm page cache:

  decode             the model's read + decode + resize alone, one process per core
  litert             model.tflite alone on pixels in memory, a thread per core
  machine limit      1 / (1/decode + 1/litert): both kinds of work sharing the cores, perfectly
  direct             petscore in-process (DirectRunner, default runtime: LiteRT on a CPU)
  direct-free-model  the same with a free model: how fast petscore feeds an accelerator
  direct-floor       the same with a free decoder too: what petscore costs beyond pixels and model
  direct-mp          --direct_running_mode=multi_processing, one process per core
  tfdata-*           tuned single-process tf.data -> LiteRT (TF's decoder, and the model's own)

With ``--baseline-repo`` (a checkout of an earlier commit, e.g. ``git worktree add /tmp/before
REV``) every petscore mode also runs with that code (``@before``) in the same run, so the
ratios compare the two on the same machine, files and model. The floor and the free model also
run at each of ``--sizes``: their CPU seconds at two sizes give a CPU cost per image without the
run's fixed cost (the slope), and the peak RSS of ``direct`` at each size shows whether memory
grows with the run. Prints one table per model and the ratios the issue targets; writes
``batches.json`` under ``--work``.

Nights of any size, and only the modes asked for (issues 30 and 33: memory and the feed ratio
from 10,000 to 1,000,000 images):

    .venv/bin/python bench/batches.py --model alpha025=DIR \
        --photos '../shared/data/real-photos/test/[1-5]?.jpg' --sizes 10000,100000 \
        --modes decode,direct-free-model --repeat 2

``--photos``: each size's folder is hard links to these few photos (``throughput.link_photos``:
``1.jpg`` ... ``N.jpg``), not generated JPEGs. ``--modes``: only these modes, at every size.
``--repeat``: the whole plan that many times in turn, so that each ratio pairs runs made
minutes apart on a shared machine. Prints, per size, each mode's images/s, time and CPU per
image and peak RSS, free model / decoding alone, and each petscore mode's RSS growth.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import importlib.util
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.throughput import generate, link_photos, link_subset, run_mode  # noqa: E402

PETSCORE_MODES = ("direct", "direct-free-model", "direct-floor", "direct-mp")
SIZED_MODES = ("direct", "direct-free-model", "direct-floor", "decode")


def has_tensorflow() -> bool:
    """Without importing it here: a child forked from a process that imported TensorFlow inherits
    its peak RSS (Linux keeps the high-water mark across fork and exec)."""
    return importlib.util.find_spec("tensorflow") is not None


def slope(points: dict[int, float]) -> float | None:
    """Per-image cost from two or more (count, seconds) points: the least-squares slope."""
    if len(points) < 2:
        return None
    counts = list(points)
    mean_n = sum(counts) / len(counts)
    mean_s = sum(points.values()) / len(points)
    return (sum((n - mean_n) * (points[n] - mean_s) for n in counts)
            / sum((n - mean_n) ** 2 for n in counts))


def plan_modes(images: int, sizes: list[int], args) -> list[tuple[str, int]]:
    """``[(mode, count)]`` of one round: every mode at ``images`` and the sized ones at every
    other size; with ``--modes``, those modes at every size."""
    variants = ["", "@before"] if args.baseline_repo else [""]
    if args.modes:
        return [(mode + variant, count) for count in sizes for mode in args.modes.split(",")
                for variant in (variants if mode.startswith("direct") else [""])]
    plan = [("decode", images), ("litert", images)]
    plan += [(mode + variant, images) for mode in PETSCORE_MODES for variant in variants]
    if has_tensorflow():
        plan += [("tfdata-tflite", images), ("tfdata-pillow-tflite", images)]
    plan += [(mode + variant, count) for count in sizes if count != images
             for mode in SIZED_MODES for variant in (variants if mode != "decode" else [""])]
    return plan


def measure(model_dir: str, folders: dict[int, str], images: int, sizes: list[int], args) -> dict:
    """Every mode of one model, ``args.repeat`` rounds: ``{(mode, count): [result per round]}``."""
    settings = argparse.Namespace(model_dir=model_dir, work=args.work, baseline_repo=args.baseline_repo)
    results = {}
    for round_index in range(args.repeat):
        for mode, count in plan_modes(images, sizes, args):
            got = run_mode(mode, folders[count], settings)
            results.setdefault((mode, count), []).append(got)
            print(f"  {round_index + 1} {mode:26s} {count:8d} {got['work_images_per_second']:9.1f} img/s "
                  f"{got['seconds'] / count * 1e3:7.3f} ms/img {got['cpu_seconds'] / count * 1e3:7.3f} "
                  f"CPU ms/img {got['peak_rss_mib']:7.0f} MiB", flush=True)
    return results


def scale_table(name: str, results: dict, sizes: list[int]) -> dict:
    """Per size: each mode's images/s (median of the rounds), time and CPU per image, peak RSS;
    free model / decoding alone per round (the issue-33 share); each petscore mode's peak RSS
    at the largest size over the smallest (issue 30: flat within 10%)."""
    table = {}
    print(f"\n{name}: by size (median of {max(len(runs) for runs in results.values())} rounds; "
          "ms and CPU ms per image on work time)")
    print(f"  {'mode':26s} {'images':>9s} {'img/s':>9s} {'ms/img':>7s} {'CPU ms':>7s} {'peak RSS':>9s}")
    for (mode, count), runs in sorted(results.items(), key=lambda item: (item[0][1], item[0][0])):
        if count not in sizes:
            continue
        entry = table.setdefault(mode, {})[count] = {
            "images_per_second": statistics.median(run["work_images_per_second"] for run in runs),
            "ms_per_image": statistics.median(run["seconds"] / count * 1e3 for run in runs),
            "cpu_ms_per_image": statistics.median(run["cpu_seconds"] / count * 1e3 for run in runs),
            "peak_rss_mib": max(run["peak_rss_mib"] for run in runs),
        }
        print(f"  {mode:26s} {count:9d} {entry['images_per_second']:9.1f} {entry['ms_per_image']:7.3f} "
              f"{entry['cpu_ms_per_image']:7.3f} {entry['peak_rss_mib']:6.0f} MiB")
    shares = {}
    for variant in ("", "@before"):
        for count in sizes:
            free, decode = (results.get((mode, count)) for mode in ("direct-free-model" + variant, "decode"))
            if free and decode:
                each = [f["work_images_per_second"] / d["work_images_per_second"]
                        for f, d in zip(free, decode, strict=False)]
                shares[f"{count}{variant}"] = each
                print(f"  free model{variant} / decoding alone at {count}: "
                      + ", ".join(f"{share:.2f}" for share in each))
    growth = {}
    for mode, by_size in table.items():
        measured = sorted(by_size)
        if mode.startswith("direct") and len(measured) >= 2:
            low, high = by_size[measured[0]]["peak_rss_mib"], by_size[measured[-1]]["peak_rss_mib"]
            growth[mode] = high / low
            print(f"  peak RSS {mode}: {low:.0f} MiB at {measured[0]} -> {high:.0f} MiB at "
                  f"{measured[-1]} images ({high / low:.2f}x)")
    return {"by_mode": table, "free_model_vs_decode": shares, "peak_rss_growth": growth}


def summarise(name: str, results: dict, images: int, sizes: list[int], cores: int) -> dict:
    """The issue's figures for one model, printed and returned."""
    def rate(mode, count=images):
        runs = results.get((mode, count))
        return statistics.median(run["work_images_per_second"] for run in runs) if runs else None

    decode, litert = rate("decode"), rate("litert")
    figures = {"cores": cores, "decode": decode, "litert": litert,
               "machine_limit": 1 / (1 / decode + 1 / litert)}
    for variant in ("", "@before"):
        if ("direct" + variant, images) not in results:
            continue
        key = variant.strip("@") or "now"
        floor_runs = {n: results[("direct-floor" + variant, n)] for n in sizes
                      if ("direct-floor" + variant, n) in results}
        floor_cpu = slope({n: statistics.median(run["cpu_seconds"] for run in runs)
                           for n, runs in floor_runs.items()})
        figures[key] = {
            "direct": rate("direct" + variant),
            "free_model": rate("direct-free-model" + variant),
            "floor": rate("direct-floor" + variant),
            "multi_processing": rate("direct-mp" + variant),
            "floor_cpu_ms_per_image": None if floor_cpu is None else floor_cpu * 1e3,
            "free_model_vs_decode_at_largest": (rate("direct-free-model" + variant, max(sizes))
                                                / rate("decode", max(sizes))),
            "direct_vs_machine_limit": rate("direct" + variant) / figures["machine_limit"],
            "peak_rss_mib": {n: max(run["peak_rss_mib"] for run in results[("direct" + variant, n)])
                             for n in sizes if ("direct" + variant, n) in results},
        }
    tfdata = [rate(mode) for mode in ("tfdata-tflite", "tfdata-pillow-tflite") if rate(mode)]
    figures["fastest_tfdata"] = max(tfdata) if tfdata else None
    now, before = figures.get("now", {}), figures.get("before")
    print(f"\n{name}: {cores} cores, {images} images (images/s on work time)")
    print(f"  decode alone {decode:.0f}, LiteRT alone {litert:.0f}, machine limit "
          f"{figures['machine_limit']:.0f}" + (f", fastest tf.data {figures['fastest_tfdata']:.0f}"
                                               if figures["fastest_tfdata"] else ""))
    print(f"  {'':24s} {'now':>9s}" + (f" {'before':>9s} {'now/before':>10s}" if before else ""))
    for key in ("direct", "free_model", "floor", "multi_processing", "floor_cpu_ms_per_image",
                "free_model_vs_decode_at_largest", "direct_vs_machine_limit"):
        line = f"  {key:24s} {now[key]:9.3f}" if now.get(key) is not None else f"  {key:24s} {'':9s}"
        if before and before.get(key) is not None and now.get(key) is not None:
            line += f" {before[key]:9.3f} {now[key] / before[key]:9.2f}x"
        print(line)
    for key, entry in (("now", now), ("before", before)):
        rss = (entry or {}).get("peak_rss_mib", {})
        if len(rss) >= 2:
            low, high = rss[min(rss)], rss[max(rss)]
            print(f"  peak RSS {key}: {low:.0f} MiB at {min(rss)} -> {high:.0f} MiB at {max(rss)} "
                  f"images ({high / low:.2f}x)")
    if figures["fastest_tfdata"]:
        print(f"  direct / fastest tf.data: {now['direct'] / figures['fastest_tfdata']:.2f}x")
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("--images", type=int,
                        help="Where every mode runs (default: the largest of --sizes).")
    parser.add_argument("--sizes", default="1000,10000",
                        help="Run sizes for the floor's per-image CPU and the RSS growth.")
    parser.add_argument("--photos", help="A glob of a few photos: each size's images are hard links "
                                         "to them instead of generated JPEGs.")
    parser.add_argument("--modes", help="Only these modes (bench/throughput.py's), at every size.")
    parser.add_argument("--repeat", type=int, default=1, help="Rounds of the whole plan, in turn.")
    parser.add_argument("--baseline-repo", help="A checkout of an earlier commit to compare with.")
    parser.add_argument("--work", default="bench_output")
    args = parser.parse_args(argv)
    sizes = sorted({int(size) for size in args.sizes.split(",")})
    images = args.images or max(sizes)
    sizes = sorted(set(sizes) | {images})
    if args.photos:
        photos = sorted(glob.glob(args.photos))
        if not photos:
            raise SystemExit(f"--photos {args.photos!r} matches no file")
        tag = hashlib.sha256("\n".join(map(os.path.abspath, photos)).encode()).hexdigest()[:8]
        folders = {count: link_photos(photos, os.path.join(args.work, f"photos-{tag}-{count}"), count)
                   for count in sizes}
    else:
        largest = generate(os.path.join(args.work, f"images-{max(sizes)}"), max(sizes))
        folders = {count: link_subset(largest[:count],
                                      os.path.join(args.work, f"images-{max(sizes)}-{count}"))
                   for count in sizes}
    report = {}
    for entry in args.model:
        name, model_dir = entry.split("=", 1)
        print(f"{name} ({model_dir}):", flush=True)
        results = measure(model_dir, folders, images, sizes, args)
        if not args.modes:
            report[name] = summarise(name, results, images, sizes, os.cpu_count())
        report.setdefault(name, {})["by_size"] = scale_table(name, results, sizes)
        report[name]["runs"] = {f"{mode} {count}": runs for (mode, count), runs in results.items()}
    with open(os.path.join(args.work, "batches.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
