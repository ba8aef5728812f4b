"""Two model directories scored end to end in turns: what a change to the model costs a whole run,
or (``--challenger``) what scoring the second as the first's challenger in the same pass costs.

    .venv/bin/python bench/model_pair.py --model with=DIR_A --model without=DIR_B \\
        [--input 'GLOB' | --images 2000] [--rounds 3] [--work bench_output/pair] [--challenger] \\
        [--flags NAME='--tta flip' ...]

Runs the real CLI (``python -m pipeline.score``, default runtime) once per model per turn, in the
order A B, B A, A B, ... so that a machine whose load drifts during the run charges both alike,
on the same images from a warm page cache. Made for the out-of-scope detector (the same classifier
exported with and without it); as good for a bank size or any two exports of one model, or for
one model scored two ways: ``--flags NAME='...'`` adds ``pipeline.score`` flags to NAME's runs
(``--model plain=DIR --model flip=DIR --flags flip='--tta flip'``: what mirrored scoring costs a
night; ``--flags faces='--faces detect'``: what the face detector costs).

Per model it prints the sums over its runs of the process's wall-clock seconds and CPU seconds
(user + system, every thread: ``resource.getrusage(RUSAGE_CHILDREN)``), the mean of the rate the
run's ``summary.json`` reports (images per second of its work), and the ratios of the second
model to the first. One pair's ratio moves by ±5% on a shared 2-core VM; the sums over rounds
are the figure to quote. Writes ``pair.json`` under ``--work``.

``--challenger`` runs, in each turn, A alone, B alone and A with B as its ``--challenger-model``
(in turn order, reversed every other turn), then B's inference alone on the same images
(``bench/throughput.py``'s ``litert`` mode: model.tflite on decoded pixels in memory, no reading,
decoding or writing). It prints the two ratios of issue 31, on the runs' work time
(``summary.json``'s ``elapsed_seconds``: model loading and checks to the last output, without the
interpreter's start and imports) and on wall time: the night with a challenger against A alone +
B's inference alone (target at most 1.1), and against A alone + B alone, two separate runs
(target at most 0.75). Writes ``challenger.json``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.throughput import generate, warm_page_cache  # noqa: E402


def children_cpu_seconds() -> float:
    """User + system CPU seconds of every finished child process so far (all their threads)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def score_once(model_dir: str, input_glob: str, output: str, *extra: str) -> dict:
    """One ``pipeline.score`` process: its wall and CPU seconds and its summary's counts."""
    shutil.rmtree(output, ignore_errors=True)
    cpu, started = children_cpu_seconds(), time.monotonic()
    process = subprocess.run(
        [sys.executable, "-m", "pipeline.score", "--input", input_glob, "--model-dir", model_dir,
         "--output", output, "--max-error-rate", "1", *extra],
        cwd=REPO, capture_output=True, text=True)
    wall, cpu = time.monotonic() - started, children_cpu_seconds() - cpu
    if process.returncode != 0:
        raise SystemExit(f"pipeline.score failed on {model_dir}:\n{process.stderr[-2000:]}")
    with open(os.path.join(output, "summary.json")) as handle:
        summary = json.load(handle)
    return {"wall_seconds": wall, "cpu_seconds": cpu, "predictions": summary["predictions"],
            "out_of_scope": summary.get("out_of_scope"), "work_seconds": summary["elapsed_seconds"],
            "images_per_second": summary["images_per_second"],
            "agreement": summary.get("challenger", {}).get("agreement")}


def inference_alone(model_dir: str, folder: str, work: str) -> dict:
    """The model's LiteRT inference alone on ``folder``'s images (``bench/throughput.py``)."""
    from bench.throughput import run_mode

    result = run_mode("litert", folder, argparse.Namespace(model_dir=model_dir, work=work,
                                                           baseline_repo=None))
    return {"work_seconds": result["seconds"], "wall_seconds": result["seconds"]}


def challenger_figures(models: list[list[str]], input_glob: str, args) -> dict:
    """Per turn: A alone, B alone, A with B as challenger, B's inference alone; the issue's ratios."""
    (first, a_dir), (second, b_dir) = models
    both = f"{first}+{second}"
    kinds = {first: (a_dir, ()), second: (b_dir, ()), both: (a_dir, ("--challenger-model", b_dir))}
    runs: dict[str, list[dict]] = {name: [] for name in [*kinds, f"{second} inference"]}
    for turn in range(2 * args.rounds):
        for name in (list(kinds) if turn % 2 == 0 else list(kinds)[::-1]):
            model_dir, extra = kinds[name]
            runs[name].append(score_once(model_dir, input_glob, os.path.join(args.work, "out"), *extra))
            print(f"{name:>24}  {runs[name][-1]['work_seconds']:6.2f} s work  "
                  f"{runs[name][-1]['wall_seconds']:6.2f} s wall", flush=True)
        runs[f"{second} inference"].append(inference_alone(b_dir, os.path.dirname(input_glob), args.work))
    total = {name: {key: sum(run[key] for run in entries) for key in ("work_seconds", "wall_seconds")}
             for name, entries in runs.items()}
    inference = total[f"{second} inference"]["work_seconds"]
    ratios = {key: {"vs_alone_plus_inference": total[both][key] / (total[first][key] + inference),
                    "vs_two_runs": total[both][key] / (total[first][key] + total[second][key])}
              for key in ("work_seconds", "wall_seconds")}
    print()
    for name, figures in total.items():
        print(f"{name:>24}  {figures['work_seconds']:7.2f} s work  {figures['wall_seconds']:7.2f} s wall "
              f"({len(runs[name])} runs)")
    for key, ratio in ratios.items():
        print(f"{key.split('_')[0]:>5}: with a challenger / ({first} + {second}'s inference alone) = "
              f"{ratio['vs_alone_plus_inference']:.3f} (target <= 1.1); / two runs = "
              f"{ratio['vs_two_runs']:.3f} (target <= 0.75)")
    print(f"agreement of the two models' decisions: {runs[both][0]['agreement']}")
    return {"runs": runs, "totals": total, "ratios": ratios, "agreement": runs[both][0]["agreement"]}


def totals(runs: list[dict]) -> dict:
    """One model's runs summed: wall and CPU seconds, the mean of the summaries' images/s."""
    return {"runs": len(runs), "wall_seconds": sum(r["wall_seconds"] for r in runs),
            "cpu_seconds": sum(r["cpu_seconds"] for r in runs),
            "mean_images_per_second": sum(r["images_per_second"] for r in runs) / len(runs),
            "predictions": runs[0]["predictions"], "out_of_scope": runs[0]["out_of_scope"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, metavar="NAME=DIR",
                        help="Twice: the first model is the baseline of the ratios.")
    parser.add_argument("--input", help="A glob of images to score (default: generated JPEGs).")
    parser.add_argument("--images", type=int, default=2000,
                        help="How many JPEGs to generate when --input is not given.")
    parser.add_argument("--rounds", type=int, default=3, help="Turns of each order (A B, then B A).")
    parser.add_argument("--work", default=os.path.join("bench_output", "pair"))
    parser.add_argument("--challenger", action="store_true",
                        help="Measure the second model as the first's challenger in the same pass.")
    parser.add_argument("--flags", action="append", default=[], metavar="NAME=FLAGS",
                        help="pipeline.score flags for NAME's runs only, e.g. flip='--tta flip'.")
    args = parser.parse_args()
    models = [entry.split("=", 1) for entry in args.model]
    if len(models) != 2 or any(len(entry) != 2 for entry in models):
        parser.error("give --model NAME=DIR exactly twice")
    flags = {name: shlex.split(value) for name, value in (entry.split("=", 1) for entry in args.flags)}
    if args.input:
        input_glob = args.input
        for path in glob.glob(input_glob):
            with open(path, "rb") as handle:
                handle.read()
    else:
        folder = os.path.join(args.work, f"images-{args.images}")
        generate(folder, args.images)
        warm_page_cache(folder)
        input_glob = os.path.join(folder, "*.jpg")
    if args.challenger:
        os.makedirs(args.work, exist_ok=True)
        result = challenger_figures(models, input_glob, args)
        with open(os.path.join(args.work, "challenger.json"), "w") as handle:
            json.dump(result, handle, indent=2)
        return 0

    runs: dict[str, list[dict]] = {name: [] for name, _ in models}
    for turn in range(2 * args.rounds):
        for name, model_dir in (models if turn % 2 == 0 else models[::-1]):
            run = score_once(model_dir, input_glob, os.path.join(args.work, "out"), *flags.get(name, ()))
            runs[name].append(run)
            print(f"{name:>16}  {run['wall_seconds']:6.2f} s wall  {run['cpu_seconds']:6.2f} s CPU  "
                  f"{run['images_per_second']:7.1f} images/s (summary)", flush=True)

    (first, _), (second, _) = models
    result = {name: {**totals(model_runs), "each": model_runs} for name, model_runs in runs.items()}
    a, b = result[first], result[second]
    result["ratios"] = {f"{second}/{first}": {
        "wall": b["wall_seconds"] / a["wall_seconds"], "cpu": b["cpu_seconds"] / a["cpu_seconds"],
        "images_per_second": b["mean_images_per_second"] / a["mean_images_per_second"]}}
    print()
    for name in (first, second):
        t = result[name]
        print(f"{name:>16}  {t['runs']} runs  {t['wall_seconds']:7.2f} s wall  "
              f"{t['cpu_seconds']:7.2f} s CPU  {t['mean_images_per_second']:7.1f} images/s  "
              f"({t['predictions']} predictions, "
              f"{t['out_of_scope']} out of scope)")
    ratio = result["ratios"][f"{second}/{first}"]
    print(f"{second}/{first}: wall {ratio['wall']:.3f}x, CPU {ratio['cpu']:.3f}x, "
          f"images/s {ratio['images_per_second']:.3f}x")
    os.makedirs(args.work, exist_ok=True)
    with open(os.path.join(args.work, "pair.json"), "w") as handle:
        json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
