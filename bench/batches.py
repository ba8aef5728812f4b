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
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.throughput import generate, link_subset, run_mode  # noqa: E402

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


def measure(model_dir: str, folders: dict[int, str], images: int, args) -> dict:
    """Every mode of one model: ``{(mode, count): result}``."""
    settings = argparse.Namespace(model_dir=model_dir, work=args.work, baseline_repo=args.baseline_repo)
    variants = ["", "@before"] if args.baseline_repo else [""]
    plan = [("decode", images), ("litert", images)]
    plan += [(mode + variant, images) for mode in PETSCORE_MODES for variant in variants]
    if has_tensorflow():
        plan += [("tfdata-tflite", images), ("tfdata-pillow-tflite", images)]
    plan += [(mode + variant, count) for count in folders if count != images
             for mode in SIZED_MODES for variant in (variants if mode != "decode" else [""])]
    results = {}
    for mode, count in plan:
        got = results[(mode, count)] = run_mode(mode, folders[count], settings)
        print(f"  {mode:26s} {count:6d} {got['work_images_per_second']:9.1f} img/s "
              f"{got['cpu_seconds'] / count * 1e3:7.3f} CPU ms/img {got['peak_rss_mib']:7.0f} MiB",
              flush=True)
    return results


def summarise(name: str, results: dict, images: int, sizes: list[int], cores: int) -> dict:
    """The issue's figures for one model, printed and returned."""
    def rate(mode, count=images):
        entry = results.get((mode, count))
        return entry["work_images_per_second"] if entry else None

    decode, litert = rate("decode"), rate("litert")
    figures = {"cores": cores, "decode": decode, "litert": litert,
               "machine_limit": 1 / (1 / decode + 1 / litert)}
    for variant in ("", "@before"):
        if ("direct" + variant, images) not in results:
            continue
        key = variant.strip("@") or "now"
        floor_cpu = slope({n: results[("direct-floor" + variant, n)]["cpu_seconds"] for n in sizes
                           if ("direct-floor" + variant, n) in results})
        figures[key] = {
            "direct": rate("direct" + variant),
            "free_model": rate("direct-free-model" + variant),
            "floor": rate("direct-floor" + variant),
            "multi_processing": rate("direct-mp" + variant),
            "floor_cpu_ms_per_image": None if floor_cpu is None else floor_cpu * 1e3,
            "free_model_vs_decode_at_largest": (rate("direct-free-model" + variant, max(sizes))
                                                / rate("decode", max(sizes))),
            "direct_vs_machine_limit": rate("direct" + variant) / figures["machine_limit"],
            "peak_rss_mib": {n: results[("direct" + variant, n)]["peak_rss_mib"] for n in sizes
                             if ("direct" + variant, n) in results},
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
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--sizes", default="1000,10000",
                        help="Run sizes for the floor's per-image CPU and the RSS growth.")
    parser.add_argument("--baseline-repo", help="A checkout of an earlier commit to compare with.")
    parser.add_argument("--work", default="bench_output")
    args = parser.parse_args(argv)
    sizes = sorted({int(size) for size in args.sizes.split(",")} | {args.images})
    largest = generate(os.path.join(args.work, f"images-{max(sizes)}"), max(sizes))
    folders = {count: link_subset(largest[:count], os.path.join(args.work, f"images-{max(sizes)}-{count}"))
               for count in sizes}
    report = {}
    for entry in args.model:
        name, model_dir = entry.split("=", 1)
        print(f"{name} ({model_dir}):", flush=True)
        results = measure(model_dir, folders, args.images, args)
        report[name] = summarise(name, results, args.images, sizes, os.cpu_count())
        report[name]["runs"] = {f"{mode} {count}": result for (mode, count), result in results.items()}
    with open(os.path.join(args.work, "batches.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
