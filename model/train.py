"""Train, fine-tune and export the classifier: ``python -m model.train --data DIR --output DIR``.

Phase 1 trains the head on a frozen ImageNet base; the optional phase 2 unfreezes the top
``--fine-tune-layers`` layers of the base at a low learning rate. Both phases stop early on
validation loss and restore the best weights before the model is exported with its metadata.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
import tempfile
import time

import keras

from model import calibration, out_of_scope
from model.architecture import (
    BASES,
    build_classifier,
    calibrate_batchnorm,
    unfreeze_top_layers,
    weights_label,
)
from model.data import (
    LabelledImages,
    class_weights,
    find_labelled_images,
    image_dataset,
    split_train_validation,
)
from model.export import check_export_dir, export_model
from model.quantize import CALIBRATION_IMAGES, Int8Request, calibration_sample, describe_int8
from serving.preprocessing import (
    CV2_JPEG,
    PILLOW_DRAFT_CV2,
    PILLOW_DRAFT_V1,
    PREPROCESSING_VERSIONS,
    RESIZE_METHODS,
)

_LOG = logging.getLogger("petscore.train")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m model.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True,
                        help="Training images: <class>/*.jpg folders, or Kaggle's cat.1.jpg names.")
    parser.add_argument("--output", required=True,
                        help="Export directory: new, empty, or an earlier model, which is replaced "
                             "atomically (a directory holding other files is refused).")
    parser.add_argument("--base", default="mobilenet_v2", choices=sorted(BASES))
    parser.add_argument("--base-weights", default="imagenet",
                        help="'imagenet' (Keras downloads them: needs internet), 'none' (random: "
                             "tests, offline demos) or a local include_top=False weights file.")
    parser.add_argument("--alpha", type=float, default=1.0, help="Width multiplier (MobileNets).")
    parser.add_argument("--input-size", type=int, default=224, help="Square input side in pixels.")
    parser.add_argument("--preprocessing", default=CV2_JPEG,
                        choices=[CV2_JPEG, PILLOW_DRAFT_V1, PILLOW_DRAFT_CV2],
                        help=f"How images become pixels, recorded in the metadata so scoring does "
                             f"the same. Default {CV2_JPEG}: 2.4x cheaper per photo than "
                             f"{PILLOW_DRAFT_V1} (the default before it) at the same held-out accuracy "
                             f"(bench/accuracy.py, 5 folds: +0.25 points at 8 epochs, 95%% interval "
                             f"-0.15 to +0.70; -0.15 at 30, -0.65 to +0.30); "
                             f"{PILLOW_DRAFT_CV2}: 2.7x cheaper, 0.35-0.45 points less accurate.")
    parser.add_argument("--resize-method", default="bilinear", choices=sorted(RESIZE_METHODS),
                        help=f"bilinear (default) or bicubic ({PILLOW_DRAFT_V1} only).")
    parser.add_argument("--epochs", type=int, default=30,
                        help="Most epochs of the head phase (default 30); early stopping on "
                             "validation loss (--patience) ends it when it stops improving. On the "
                             "real photos it stopped after 16-29 epochs and scored 0.9 points better "
                             "held out than a cap of 10, where every fold was still improving "
                             "(bench/accuracy.py --epochs).")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--no-augment", action="store_true", help="Leave out augmentation layers.")
    parser.add_argument("--validation-fraction", type=float, default=0.2)
    parser.add_argument("--patience", type=int, default=3, help="Early-stopping patience (epochs).")
    parser.add_argument("--fine-tune-layers", type=int, default=0,
                        help="Unfreeze this many top base layers for a second phase (0: none).")
    parser.add_argument("--fine-tune-epochs", type=int, default=5)
    parser.add_argument("--fine-tune-learning-rate", type=float, default=1e-5)
    parser.add_argument("--int8", action="store_true",
                        help="Also export model_int8.tflite, a full-integer model calibrated on "
                             "training images, its head re-fitted on the integer base's features "
                             "of the training images, kept only if on the validation images its accuracy "
                             "drops by at most 0.5 points and its log loss rises by at most 0.01 "
                             "(score with it: --runtime tflite-int8).")
    parser.add_argument("--int8-calibration-images", type=int, default=CALIBRATION_IMAGES,
                        help=f"Training images to calibrate on (default {CALIBRATION_IMAGES}).")
    out_of_scope.add_arguments(parser)
    parser.add_argument("--no-calibration", action="store_true",
                        help="Export the probabilities as trained. By default a temperature is "
                             "fitted on the validation split (log loss minimised) and put inside "
                             "the model, only if it lowers the log loss of validation images it was "
                             "not fitted on (two-fold cross-fit; recorded in metadata.json either way).")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--model-version", default=None,
                        help="Version string stored with every prediction (default: base-UTC time).")
    return parser.parse_args(argv)


class EpochTimer(keras.callbacks.Callback):
    """Records wall-clock seconds per epoch (reported in the metadata and the summary line)."""

    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(round(time.monotonic() - self._start, 3))


def fit_phase(classifier, train_ds, val_ds, *, epochs, learning_rate, patience, weights,
              checkpoint: str, timer: EpochTimer) -> keras.callbacks.History:
    classifier.compile(optimizer=keras.optimizers.Adam(learning_rate),
                       loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    callbacks = [
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience,
                                      restore_best_weights=True),
        keras.callbacks.ModelCheckpoint(checkpoint, monitor="val_loss", save_best_only=True),
        timer,
    ]
    # shuffle=False: the dataset shuffles itself (model.data.image_dataset); Keras ignores the
    # argument for a tf.data.Dataset, and warns when it is True, its default.
    return classifier.fit(train_ds, validation_data=val_ds, epochs=epochs, shuffle=False,
                          class_weight=weights, callbacks=callbacks, verbose=2)


def summarise_split(data: LabelledImages) -> dict:
    return {"images": len(data.paths), "per_class": data.counts()}


def train(args: argparse.Namespace) -> dict:
    """Train and export; returns the exported metadata as a dict."""
    check_export_dir(args.output)
    keras.utils.set_random_seed(args.seed)
    size = (args.input_size, args.input_size)
    if args.resize_method not in PREPROCESSING_VERSIONS[args.preprocessing]:
        raise ValueError(f"--preprocessing {args.preprocessing} resizes with "
                         f"{sorted(PREPROCESSING_VERSIONS[args.preprocessing])}, not {args.resize_method}")
    data = find_labelled_images(args.data)
    train_split, val_split = split_train_validation(data, args.validation_fraction, args.seed)
    if not val_split.paths:
        raise ValueError("--validation-fraction must leave at least one validation image per class")
    scope = None  # checked before training: a refusal comes before any work
    if args.out_of_scope != "none":
        scope = out_of_scope.ScopeRequest(
            fit_paths=train_split.paths, held_out_paths=val_split.paths, fit_source="training split",
            held_out_source="validation split", share=args.out_of_scope_share, k=args.out_of_scope_k,
            max_bank=args.out_of_scope_bank, seed=args.seed)
    train_ds = image_dataset(train_split, size, args.resize_method, args.preprocessing,
                             args.batch_size, True, args.seed)
    val_ds = image_dataset(val_split, size, args.resize_method, args.preprocessing,
                           args.batch_size, False, args.seed)
    classifier, base = build_classifier(
        args.base, size, len(data.class_names), base_weights=args.base_weights, alpha=args.alpha,
        dropout=args.dropout, augment=not args.no_augment, seed=args.seed)
    if args.base_weights == "none":
        calibrate_batchnorm(args.base, base, next(iter(train_ds))[0])
    weights = class_weights(train_split)
    timer = EpochTimer()
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = os.path.join(scratch, "best.keras")
        history = fit_phase(classifier, train_ds, val_ds, epochs=args.epochs,
                            learning_rate=args.learning_rate, patience=args.patience,
                            weights=weights, checkpoint=checkpoint, timer=timer)
        phases = {"head": _best(history)}
        if args.fine_tune_layers > 0:
            unfrozen = unfreeze_top_layers(base, args.fine_tune_layers)
            _LOG.info("fine-tuning %d base layers at lr %g", unfrozen, args.fine_tune_learning_rate)
            history = fit_phase(classifier, train_ds, val_ds, epochs=args.fine_tune_epochs,
                                learning_rate=args.fine_tune_learning_rate, patience=args.patience,
                                weights=weights, checkpoint=checkpoint, timer=timer)
            phases["fine_tune"] = {**_best(history), "unfrozen_layers": unfrozen}
    val_loss, val_accuracy = classifier.evaluate(val_ds, verbose=0)
    int8 = None
    if args.int8:
        int8 = Int8Request(
            calibration_paths=calibration_sample(train_split.paths, args.seed, args.int8_calibration_images),
            validation_paths=val_split.paths, validation_labels=val_split.labels,
            calibration_source="training split", validation_source="validation split",
            head_paths=train_split.paths, head_labels=train_split.labels)
    calibration_request = None if args.no_calibration else calibration.CalibrationRequest(
        val_split.paths, val_split.labels, "validation split", seed=args.seed)
    version = args.model_version or (
        f"{args.base}-{datetime.datetime.now(datetime.UTC):%Y%m%dT%H%M%SZ}")
    metadata = export_model(
        classifier, args.output, class_names=data.class_names, base=args.base,
        base_weights=weights_label(args.base_weights),
        model_version=version, resize_method=args.resize_method, preprocessing=args.preprocessing,
        training={"data": os.path.abspath(args.data), "seed": args.seed,
                  "train": summarise_split(train_split), "validation": summarise_split(val_split),
                  "class_weights": weights, "alpha": args.alpha, "augment": not args.no_augment,
                  "epoch_seconds": timer.seconds, "phases": phases},
        metrics={"val_loss": round(float(val_loss), 6), "val_accuracy": round(float(val_accuracy), 6)},
        int8=int8, scope=scope, calibration=calibration_request)
    return {"metadata": metadata, "epoch_seconds": timer.seconds}


def _best(history: keras.callbacks.History) -> dict:
    losses = history.history["val_loss"]
    best = min(range(len(losses)), key=losses.__getitem__)
    return {"epochs_run": len(losses), "best_epoch": best + 1,
            "best_val_loss": round(float(losses[best]), 6),
            "best_val_accuracy": round(float(history.history["val_accuracy"][best]), 6)}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    result = train(args)
    metadata = result["metadata"]
    seconds = result["epoch_seconds"]
    print(f"trained {metadata.model_version}: val_loss {metadata.metrics['val_loss']:.4f}, "
          f"val_accuracy {metadata.metrics['val_accuracy']:.4f}, {len(seconds)} epochs, "
          f"{sum(seconds) / len(seconds):.1f} s/epoch -> {args.output}")
    if metadata.calibration:
        print(calibration.describe(metadata.calibration))
    if metadata.out_of_scope:
        print(out_of_scope.describe(metadata.out_of_scope))
    if metadata.tflite_int8:
        print(describe_int8(metadata.tflite_int8))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
