"""The real CLI on a GPU machine without TensorFlow: LiteRT on its CPUs against --runtime keras on its GPU.

    # 1. Here (PyPI reachable): train the two models, and pack what the GPU machine lacks under
    #    .device/ (Beam, LiteRT, Keras: a trimmed Python 3.12 site-packages, with the models,
    #    under the 64 MiB a device call carries; the tarball is checked against it).
    .venv/bin/python bench/keras_gpu.py prepare [--weights mobilenet_2_5_224_tf_no_top.h5]
    # 2. There: one device call with carry [".device"] (prepare prints it), which runs
    python3 bench/keras_gpu.py run --images 4000
    # The same run here, as a check of the script and of keras on JAX's CPU:
    .venv/bin/python bench/keras_gpu.py run --images 200 --runtimes tflite,keras,saved_model

``prepare`` trains, on generated labelled images (the figures are speed and agreement, not
accuracy), the alpha 0.25 MobileNet on its ImageNet weights (``--weights``; random without) and a
MobileNetV2 1.0 with a random base (no weights offline), both at 224 px with model.train's
defaults otherwise, and exports them as model.train does.

``run`` generates ``--images`` photo-like JPEGs (bench/throughput.py's generator), then for each
model scores them with ``python -m pipeline.score`` once per runtime (``--runtimes``, in a fresh
process, after one untimed 64-image run of each runtime: the site is unpacked without .pyc files),
and prints images/s end to end (the run summary's: launch, model checks, load and compilation
included, to the last output), the process's wall time, and how far each runtime's probabilities
and decisions are from the first one's. The issue-26 targets: the same decision for every image,
probabilities within 1e-4. The keras runs use ``--keras-backend`` (default jax). Results also go
to ``keras_gpu.json`` in ``$OUT`` (the device call's output folder) or ``--work``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

DEVICE_DIR = os.path.join(REPO, ".device")
SITE = os.path.join(DEVICE_DIR, "site.tar.xz")
MODELS = os.path.join(DEVICE_DIR, "models")
CARRY_LIMIT = 64 * 1024 * 1024  # what a device call carries: the working tree and `carry` paths
# What the lent machine lacks for the CLI (its Python 3.12 has NumPy, pyarrow, Pillow, OpenCV,
# SciPy, matplotlib, h5py, absl-py, rich and JAX; ../shared/device/README.md): Beam and the
# dependencies it misses there, LiteRT, and Keras with the two it misses.
SITE_PACKAGES = ("apache-beam==2.77.0", "ai-edge-litert==2.3.0", "proto-plus", "fastavro", "fasteners",
                 "httplib2", "jsonpickle", "objsize<0.8", "pytz", "zstandard", "beartype<0.23,>=0.21",
                 "pyparsing", "cryptography<51", "cffi", "pycparser", "keras==3.15.1", "namex", "optree",
                 "packaging", "pillow-heif==1.8.1")
# Parts no scoring run imports: Beam's examples, YAML and dataframe APIs and interactive runner,
# LiteRT's GPU/WebGPU accelerators and tools, and every package's tests and C sources.
SITE_TRIM = ("apache_beam/examples", "apache_beam/yaml", "apache_beam/dataframe",
             "apache_beam/runners/interactive", "ai_edge_litert/vendors", "ai_edge_litert/libLiteRt.so",
             "ai_edge_litert/libLiteRtWebGpuAccelerator.so", "ai_edge_litert/tools")
PLATFORMS = ("manylinux_2_34_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64")
WARM_UP_IMAGES = 64
TARGET_DIFFERENCE = 1e-4


def build_site(target: str, python_version: str = "3.12") -> int:
    """Download the wheels of ``SITE_PACKAGES`` for CPython ``python_version`` on x86-64 Linux,
    unpack them (a wheel is a zip: unpacking is the install; pip refuses to install wheels of
    another Python), trim, strip the shared objects and pack them as ``target`` (tar.xz); return
    its size in bytes."""
    with tempfile.TemporaryDirectory(prefix="petscore-site-") as work:
        wheels, site = os.path.join(work, "wheels"), os.path.join(work, "site")
        abi = "cp" + python_version.replace(".", "")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                        "--no-deps", "--only-binary=:all:", "--python-version", python_version,
                        "--implementation", "cp", *(f"--platform={p}" for p in PLATFORMS),
                        f"--abi={abi}", "--abi=abi3", "--abi=none", "-d", wheels, *SITE_PACKAGES],
                       check=True)
        for wheel in sorted(glob.glob(os.path.join(wheels, "*.whl"))):
            shutil.unpack_archive(wheel, site, format="zip")
        for part in SITE_TRIM:
            path = os.path.join(site, part)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        for folder, names, files in os.walk(site, topdown=True):
            for name in [n for n in names if n == "tests"]:
                shutil.rmtree(os.path.join(folder, name))
                names.remove(name)
            for name in files:
                path = os.path.join(folder, name)
                if name.endswith(("_test.py", ".c", ".cpp", ".pyx", ".pxd", ".pyi")):
                    os.remove(path)
                elif ".so" in name:
                    subprocess.run(["strip", "--strip-unneeded", path], check=False)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with tarfile.open(target, "w:xz", preset=6) as archive:
            archive.add(site, arcname=".")
    return os.path.getsize(target)


def train_models(weights: str | None, work: str) -> dict[str, str]:
    """``{name: model directory}``: the two models, trained and exported by model.train."""
    from model.synthetic import write_labelled_folders
    from model.train import parse_args, train

    data = os.path.join(work, "keras-gpu-train")
    if not os.path.isdir(data):
        write_labelled_folders(data, per_class=40, size=(256, 256))
    specs = {"mobilenet_025": ["--base", "mobilenet", "--alpha", "0.25",
                               "--base-weights", weights if weights else "none"],
             "mobilenet_v2": ["--base", "mobilenet_v2", "--alpha", "1.0", "--base-weights", "none"]}
    models = {}
    for name, flags in specs.items():
        models[name] = os.path.join(work, f"keras-gpu-{name}")
        train(parse_args(["--data", data, "--output", models[name], *flags, "--epochs", "3",
                          "--fine-tune-epochs", "0", "--batch-size", "16", "--model-version", name]))
    return models


def carried_bytes() -> int:
    """Bytes a device call carries: the files git tracks or would track, and .device/."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    files = [os.path.join(REPO, path) for path in listed if path]
    tree = sum(os.path.getsize(path) for path in files if os.path.isfile(path))
    device = sum(os.path.getsize(os.path.join(folder, name))
                 for folder, _, files in os.walk(DEVICE_DIR) for name in files)
    return tree + device


def prepare(args: argparse.Namespace) -> int:
    """Build .device/ (git ignores it; a device call carries it when named in ``carry``)."""
    started = time.monotonic()
    print(f"site-packages for Python 3.12: {build_site(SITE) / 2**20:.1f} MiB "
          f"({time.monotonic() - started:.0f} s)", flush=True)
    for name, model_dir in train_models(args.weights, args.work).items():
        target = os.path.join(MODELS, name)
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(model_dir, target)
    size = carried_bytes()
    print(f"a device call carries {size / 2**20:.1f} MiB of {CARRY_LIMIT / 2**20:.0f}")
    if size > CARRY_LIMIT:
        print("too much to carry: remove what .device/ or the working tree does not need", file=sys.stderr)
        return 1
    print("device call: carry ['.device'], command:\n  mkdir -p /tmp/site && tar -C /tmp/site -xJf "
          ".device/site.tar.xz && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && "
          "python3 bench/keras_gpu.py run --images 4000 --work /tmp/bench")
    return 0


def score(model_dir: str, images: str, output: str, runtime: str, backend: str, flags: list[str]) -> dict:
    """One CLI run in a fresh process; its summary with the process's wall time."""
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
    started = time.monotonic()
    process = subprocess.run([sys.executable, "-m", "pipeline.score", "--input", images, "--model-dir",
                              model_dir, "--output", output, "--runtime", runtime, "--overwrite", *flags],
                             cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.monotonic() - started
    if process.returncode != 0:
        raise RuntimeError(f"{runtime} on {model_dir} exited {process.returncode}:\n{process.stderr[-3000:]}")
    with open(os.path.join(output, "summary.json")) as handle:
        return {**json.load(handle), "wall_seconds": wall}


def probabilities(output: str, class_names: list[str]) -> dict:
    import pyarrow.parquet as pq

    table = pq.read_table(os.path.join(output, "predictions"))
    columns = [table.column(f"prob_{name}").to_pylist() for name in class_names]
    return {path: row for path, row in zip(table.column("path").to_pylist(), zip(*columns, strict=True),
                                           strict=True)}


def device_of(runtime: str, backend: str) -> str:
    """What the runtime scores on here, asked as the CLI asks it."""
    if runtime.startswith("tflite"):
        return f"CPU x{os.cpu_count()}"
    code = ("from serving.runtimes import configure_devices, keras_devices; "
            f"print(keras_devices({backend!r}) if {runtime == 'keras'} else configure_devices())")
    probe = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                           env={**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"})
    return (probe.stdout.strip().splitlines() or ["?"])[-1] + (f" ({backend})" if runtime == "keras" else "")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from bench.throughput import generate
    from serving.metadata import read_metadata

    runtimes = args.runtimes.split(",")
    paths = generate(os.path.join(args.work, f"images-{args.images}"), args.images)
    warm = generate(os.path.join(args.work, f"images-{WARM_UP_IMAGES}"), WARM_UP_IMAGES)
    images, warm_images = os.path.join(os.path.dirname(paths[0]), "*.jpg"), os.path.join(
        os.path.dirname(warm[0]), "*.jpg")
    models = sorted(glob.glob(os.path.join(args.models, "*", "metadata.json")))
    if not models:
        print(f"no model directory under {args.models}: run `bench/keras_gpu.py prepare` first",
              file=sys.stderr)
        return 1
    results, ok = [], True
    print(f"{len(paths)} images; {os.cpu_count()} cores; python {sys.version.split()[0]}", flush=True)
    print(f"{'model':14s} {'runtime':12s} {'device':22s} {'images/s':>9s} {'wall s':>7s} "
          f"{'max |diff|':>11s} {'decisions':>10s}")
    for metadata_path in models:
        model_dir = os.path.dirname(metadata_path)
        name, metadata = os.path.basename(model_dir), read_metadata(model_dir)
        first = None
        for runtime in runtimes:
            output = os.path.join(args.work, "out", f"{name}-{runtime}")
            if metadata_path == models[0]:  # each runtime's imports write their .pyc files once
                score(model_dir, warm_images, output + "-warm-up", runtime, args.keras_backend,
                      args.score_flag)
            summary = score(model_dir, images, output, runtime, args.keras_backend, args.score_flag)
            scored = probabilities(output, metadata.class_names)
            first = first or scored
            paths_scored = sorted(first)
            got = np.array([scored[p] for p in paths_scored])
            want = np.array([first[p] for p in paths_scored])
            differing = int(np.sum(got.argmax(axis=1) != want.argmax(axis=1)))
            worst = float(np.max(np.abs(got - want)))
            agrees = sorted(scored) == paths_scored and differing == 0 and worst <= TARGET_DIFFERENCE
            ok &= agrees
            row = {"model": name, "runtime": runtime, "device": device_of(runtime, args.keras_backend),
                   "images": summary["predictions"], "images_per_second": summary["images_per_second"],
                   "wall_seconds": round(summary["wall_seconds"], 1), "max_abs_difference": worst,
                   "decisions_differing": differing, "against": runtimes[0]}
            results.append(row)
            print(f"{name:14s} {runtime:12s} {row['device'][:22]:22s} {row['images_per_second']:9.1f} "
                  f"{row['wall_seconds']:7.1f} {worst:11.2e} {differing:10d}", flush=True)
    destination = os.environ.get("OUT") or args.work
    with open(os.path.join(destination, "keras_gpu.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    print(f"every runtime against {runtimes[0]}: same decisions and probabilities within "
          f"{TARGET_DIFFERENCE:g}: {'yes' if ok else 'NO'}")
    return 0 if ok else 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    prepare_parser = commands.add_parser("prepare",
                                         help="here: the models and the site tarball under .device/")
    prepare_parser.add_argument("--weights", help="the alpha 0.25 MobileNet's include_top=False ImageNet "
                                "weights (mobilenet_2_5_224_tf_no_top.h5); default ../shared/data/weights/"
                                "'s when present, else a random base")
    prepare_parser.add_argument("--work", default="bench_output")
    run_parser = commands.add_parser("run", help="there (or here): the CLI once per runtime and model")
    run_parser.add_argument("--images", type=int, default=4000)
    run_parser.add_argument("--models", default=MODELS)
    run_parser.add_argument("--runtimes", default="tflite,keras",
                            help="comma-separated; the first is the one the others are compared with")
    run_parser.add_argument("--keras-backend", default=os.environ.get("KERAS_BACKEND", "jax"))
    run_parser.add_argument("--score-flag", action="append", default=[],
                            help="a flag for every pipeline.score run, e.g. "
                                 "--score-flag=--batch-size=256")
    run_parser.add_argument("--work", default="bench_output")
    args = parser.parse_args()
    if args.command == "prepare":
        shared = os.path.join(REPO, "..", "shared", "data", "weights", "mobilenet_2_5_224_tf_no_top.h5")
        args.weights = args.weights or (shared if os.path.exists(shared) else None)
        args.weights = os.path.abspath(args.weights) if args.weights else None
        return prepare(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
