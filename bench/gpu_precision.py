"""What TF32 does to a ResNet50 classifier on a GPU: rate and probabilities, TF32 vs float32.

    KERAS_BACKEND=jax python3 bench/gpu_precision.py      (a CUDA build of JAX; no weights needed)

Ampere and newer GPUs run float32 convolutions in TF32 by default (TensorFlow and JAX alike).
This builds the product's ResNet50 classifier with a random base (BatchNorm calibrated on the
benchmark images, so activations are realistic), compiles it with XLA and times it at both
precisions on 512 benchmark images; it prints the largest probability difference between them.
It is why ``serving.runtimes`` turns TF32 off (``configure_devices``, ``keras_predict``).
"""
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.inference import decode_all, time_batches  # noqa: E402
from bench.throughput import generate  # noqa: E402
from model.architecture import build_classifier, calibrate_batchnorm  # noqa: E402
from serving.runtimes import keras_predict  # noqa: E402


def main() -> None:
    paths = generate(os.path.join("bench_output", "images-512"), 512)
    pixels, _ = decode_all(paths, (224, 224), os.cpu_count())
    classifier, base = build_classifier("resnet50", (224, 224), 2, base_weights="none", augment=False)
    calibrate_batchnorm("resnet50", base, pixels[:16].astype("float32"))
    run = keras_predict(classifier, full_float32=False)  # each precision set around it below

    def predict(batch):
        return run(batch)[0]
    probabilities = {}
    for precision in ("default", "highest"):  # default = TF32 on Ampere+; highest = float32
        with jax.default_matmul_precision(precision):
            probabilities[precision] = np.concatenate(
                [predict(pixels[start:start + 64]) for start in range(0, len(pixels), 64)])
            for batch in (64, 256):
                rate = time_batches(predict, pixels, batch, min_seconds=3.0)
                print(f"resnet50 {precision:8s} batch {batch:4d}: {rate:8.1f} images/s", flush=True)
    worst = float(np.max(np.abs(probabilities["default"] - probabilities["highest"])))
    print(f"largest |TF32 - float32| probability over {len(pixels)} images: {worst:.2e}")


if __name__ == "__main__":
    main()
