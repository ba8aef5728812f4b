"""Bring a model trained in a notebook under the model contract: ``python -m model.package``.

A notebook-trained Keras model (``.keras`` or legacy ``.h5``, from Keras 3 or from Keras 2 /
tf.keras 2.x, Teachable Machine's ``keras_model.h5`` among them, or a SavedModel directory,
loaded by ``model.notebook_model``; or, for bottleneck-feature models, a head trained on a named
Keras application's features) is wrapped so that it takes what every petscore model takes,
uint8 pixels, and gives what every petscore model gives, class probabilities:

    uint8 pixels -> the notebook's pixel scaling (--scaling) -> [feature extractor] -> the model
                 -> [softmax/sigmoid with --from-logits] -> [1 - p, p] for one sigmoid output

The metadata records the notebook's loader (``--loader keras`` = ``keras.utils.load_img``, the
loader of ``ImageDataGenerator.flow_from_directory``) and the scorer decodes every image with
exactly that loader, so petscore's scores equal the notebook's ``model.predict``. Everything is
checked before anything is written; then ``model.export`` writes the SavedModel, the checked
``model.tflite`` and ``metadata.json`` as for a model trained here.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import re
import sys
import warnings

import keras
import numpy as np

from model import calibration, out_of_scope
from model.architecture import (
    FEATURE_EXTRACTORS,
    SCALINGS,
    SigmoidToTwoClasses,
    build_base,
    is_weights_file,
    weights_label,
)
from model.data import LabelledImages, labelled_images_for, split_train_validation
from model.export import check_export_dir, export_model
from model.notebook_model import PackagingError, load_notebook_model
from model.quantize import CALIBRATION_IMAGES, Int8Request, calibration_sample, describe_int8
from serving.metadata import file_sha256
from serving.preprocessing import KERAS_LOAD_IMG, PILLOW_FIT, PREPROCESSING_VERSION, PREPROCESSING_VERSIONS
from serving.reference import reference_batch

_LOG = logging.getLogger("petscore.package")
LOADERS = {"keras": KERAS_LOAD_IMG, "petscore": PREPROCESSING_VERSION, "teachable-machine": PILLOW_FIT}
# each loader's own default
DEFAULT_INTERPOLATION = {"keras": "nearest", "petscore": "bilinear", "teachable-machine": "lanczos"}
PROBE_SEEDS = tuple(range(200, 216))
PROBABILITY_TOLERANCE = 1e-3
# Teachable Machine's labels.txt: "0 Cats", "1 Dogs", ... (its index, a space, the class name)
NUMBERED_LABEL = re.compile(r"^(\d+)\s+(\S.*)$")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m model.package", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keras", required=True, metavar="PATH",
                        help="The notebook's model: .keras or legacy .h5 (Keras 3 or Keras 2 / "
                             "tf.keras 2.x: Teachable Machine's keras_model.h5), or a SavedModel "
                             "directory. With --feature-extractor: the head trained on the features.")
    parser.add_argument("--output", required=True,
                        help="Model directory to write: new, empty, or an earlier model, which is "
                             "replaced atomically (a directory holding other files is refused).")
    classes = parser.add_mutually_exclusive_group(required=True)
    classes.add_argument("--classes", help="Class names in output order, comma-separated: cat,dog.")
    classes.add_argument("--classes-from", metavar="DIR",
                         help="The training folder: its sorted sub-folder names, as "
                              "flow_from_directory and image_dataset_from_directory number them.")
    classes.add_argument("--labels", metavar="FILE",
                         help="A labels file, one class name per line in output order; "
                              "Teachable Machine's labels.txt ('0 Cats') as it is exported.")
    parser.add_argument("--scaling", choices=sorted(SCALINGS),
                        help="How the notebook scaled pixels before model.predict: 1/255 "
                             "(rescale=1./255), tf (x/127.5 - 1: MobileNet, Inception), caffe "
                             "(BGR minus ImageNet means: ResNet50, VGG), torch (DenseNet) or none "
                             "(the model scales inside). Default: the feature extractor's own; "
                             "required otherwise.")
    parser.add_argument("--allow-double-scaling", action="store_true",
                        help="Package a --scaling other than none although the model's input "
                             "layer (Rescaling, Normalization) scales pixels itself: only when the "
                             "notebook really fed it pixels scaled twice. Refused otherwise.")
    parser.add_argument("--loader", choices=sorted(LOADERS), default="keras",
                        help="How the notebook read and resized images: keras = keras.utils.load_img "
                             "/ ImageDataGenerator.flow_from_directory (default); petscore = "
                             "petscore's own loader (EXIF rotation, DCT-scaled JPEG decoding); "
                             "teachable-machine = Teachable Machine's Python sample (ImageOps.fit: "
                             "a centred crop to the input's shape, LANCZOS).")
    parser.add_argument("--interpolation", default=None,
                        help="The loader's resize method: nearest (Keras's default), bilinear, "
                             "bicubic, hamming, box, lanczos (Teachable Machine's). Default: the "
                             "loader's own default.")
    parser.add_argument("--feature-extractor", choices=sorted(FEATURE_EXTRACTORS),
                        help="Bottleneck-feature models: the Keras application (include_top=False) "
                             "whose features the head was trained on; it is put in front of the head.")
    parser.add_argument("--feature-weights", default="imagenet",
                        help="The feature extractor's weights: imagenet (Keras downloads them: "
                             "needs internet), none (random) or a local weights file.")
    parser.add_argument("--alpha", type=float, default=1.0,
                        help="Width multiplier of a MobileNet feature extractor.")
    parser.add_argument("--input-size", type=int, nargs="+", metavar="SIDE",
                        help="Input height [width] in pixels, when the model's input shape does not "
                             "fix it (default with --feature-extractor: 224).")
    parser.add_argument("--from-logits", action="store_true",
                        help="The model's last layer has no softmax/sigmoid: add it.")
    parser.add_argument("--model-version", default=None,
                        help="Version string stored with every prediction (default: file name-UTC time).")
    parser.add_argument("--int8-images", metavar="DIR",
                        help="Also export model_int8.tflite, a full-integer model, using these "
                             "labelled images (<class>/*.jpg folders named as the classes, or "
                             "cat.1.jpg names): a seeded half calibrates it (up to "
                             f"{CALIBRATION_IMAGES} images), the other half judges it: it is kept "
                             "only if its accuracy drops by at most 0.5 points and its log loss "
                             "rises by at most 0.01 against the float model.")
    parser.add_argument("--scope-images", metavar="DIR",
                        help="In-scope images under DIR (any depth, e.g. the notebook's training "
                             "folder) to fit the out-of-scope detector on: a seeded 80%% are the "
                             "images distances are measured to, the other 20%% set its threshold "
                             "(--out-of-scope-share). Without it the model has no detector.")
    parser.add_argument("--calibration-images", metavar="DIR",
                        help="Labelled images the notebook did not train on (<class>/*.jpg folders "
                             "named as the classes, or cat.1.jpg names) to calibrate the model on: "
                             "a temperature fitted on them (log loss minimised) goes inside the "
                             "model, only if it lowers the log loss of the images it was not "
                             "fitted on (two-fold cross-fit; recorded in metadata.json either "
                             "way). Without it the probabilities stay the notebook's.")
    out_of_scope.add_arguments(parser)
    return parser.parse_args(argv)


def scope_request(args: argparse.Namespace) -> out_of_scope.ScopeRequest | None:
    """The detector ``--scope-images`` asks for, checked before anything is loaded; None (and a
    log line) without them."""
    if args.out_of_scope == "none":
        return None
    if not args.scope_images:
        _LOG.info("no --scope-images: the packaged model has no out-of-scope detector (no scope_score)")
        return None
    try:
        fit, held_out = out_of_scope.split_for_detector(out_of_scope.image_paths(args.scope_images), seed=0)
        return out_of_scope.ScopeRequest(
            fit_paths=fit, held_out_paths=held_out, fit_source=f"{args.scope_images} (seeded 80%)",
            held_out_source=f"{args.scope_images} (the other 20%)", share=args.out_of_scope_share,
            k=args.out_of_scope_k, max_bank=args.out_of_scope_bank)
    except (OSError, ValueError) as error:
        raise PackagingError(f"--scope-images: {error}") from error


def resolve_class_names(args: argparse.Namespace) -> list[str]:
    if args.classes:
        return [name.strip() for name in args.classes.split(",") if name.strip()]
    if args.labels:
        return read_labels(args.labels)
    if not os.path.isdir(args.classes_from):
        raise PackagingError(f"--classes-from {args.classes_from} is not a directory")
    return sorted(name for name in os.listdir(args.classes_from)
                  if os.path.isdir(os.path.join(args.classes_from, name)))


def read_labels(path: str) -> list[str]:
    """Class names in output order from a labels file (``--labels``): one name per line, blank
    lines skipped, a UTF-8 byte-order mark and spaces around a name ignored. When every line
    starts with its own index, 0, 1, 2, ... (Teachable Machine's ``0 Cats``), the index is not
    part of the name; numbered lines in another order are refused, as ambiguous."""
    try:
        with open(path, encoding="utf-8-sig") as handle:
            lines = [line.strip() for line in handle if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise PackagingError(f"--labels {path}: {error}") from error
    numbered = [NUMBERED_LABEL.match(line) for line in lines]
    if lines and all(numbered):
        indices = [int(match.group(1)) for match in numbered]
        if indices != list(range(len(lines))):
            raise PackagingError(f"--labels {path} numbers its lines {indices}, not 0 to "
                                 f"{len(lines) - 1} in order: list the names in output order")
        return [match.group(2) for match in numbered]
    return lines


def resolve_input_size(args: argparse.Namespace, model: keras.Model) -> tuple[int, int]:
    """The side(s) from ``--input-size``, else from the model's input shape (one RGB image
    input: ``check_channels`` has passed unless a feature extractor feeds the model)."""
    if args.input_size:
        if len(args.input_size) > 2:
            raise PackagingError("--input-size takes a side, or a height and a width")
        return args.input_size[0], args.input_size[-1]
    if args.feature_extractor:
        return 224, 224
    shape = model.input_shape
    if shape[1] is None or shape[2] is None:
        raise PackagingError(f"the model's input shape {shape} does not fix the image size: "
                             "pass --input-size (the target_size the notebook used)")
    return int(shape[1]), int(shape[2])


def input_scaling_layer(model: keras.Model) -> keras.layers.Layer | None:
    """The ``Rescaling`` or ``Normalization`` layer through which the model's pixels first pass,
    if the first layer that changes them is one (``first_value_layer``), else None."""
    layer = first_value_layer(model)
    return layer if isinstance(layer, keras.layers.Rescaling | keras.layers.Normalization) else None


def first_value_layer(model: keras.Model) -> keras.layers.Layer | None:
    """The first layer that changes the pixel values at inference, looked for past input
    layers, into nested models, and past layers that leave the values' range as it is at
    inference (``Random*`` augmentation, ``Resizing``, ``CenterCrop``), as Keras's image
    classification tutorial and ``keras.applications`` with ``include_preprocessing`` place
    them; None if there is none."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found = first_value_layer(layer)
            if found is not None:
                return found
        elif not (isinstance(layer, keras.layers.InputLayer | keras.layers.Resizing | keras.layers.CenterCrop)
                  or type(layer).__name__.startswith("Random")):
            return layer
    return None


def check_single_scaling(model: keras.Model, scaling: str) -> None:
    """Refuse ``--scaling`` other than ``none`` for a model that scales its input itself: the
    packaged model would scale the pixels twice (1/255 then Rescaling(1/255): every image
    near black to the model), silently."""
    layer = input_scaling_layer(model)
    if scaling == "none" or layer is None:
        return
    config = layer.get_config()
    values = ", ".join(f"{key}={config[key]!r:.40}" for key in ("scale", "offset", "mean", "variance")
                       if config.get(key) is not None)
    raise PackagingError(
        f"the model's input layer '{layer.name}' ({type(layer).__name__}{f'({values})' if values else ''}) "
        f"already scales pixels, so --scaling {scaling} would scale them twice: pass --scaling none, "
        "or --allow-double-scaling if the notebook really fed the model pixels scaled both ways")


def check_channels(model: keras.Model, what: str) -> None:
    shape = model.input_shape
    if isinstance(shape, list) or len(shape) != 4 or shape[-1] != 3:
        raise PackagingError(f"{what} takes {shape}: petscore scores RGB images (batch, height, "
                             "width, 3); a grayscale or multi-input model is not supported")


def build_feature_extractor(args: argparse.Namespace, size: tuple[int, int],
                            head: keras.Model) -> keras.Model:
    weights = args.feature_weights
    if is_weights_file(weights) and not os.path.isfile(weights):
        raise PackagingError(f"--feature-weights {weights} is not a file: pass the "
                             f"{args.feature_extractor} include_top=False weights file, or "
                             "'imagenet' to download them (needs internet)")
    base = build_base(args.feature_extractor, size, weights, args.alpha)
    produced, wanted = base.output_shape[1:], head.input_shape[1:]
    if len(produced) != len(wanted) or any(w is not None and w != p for p, w in zip(produced, wanted,
                                                                                      strict=False)):
        raise PackagingError(
            f"{args.feature_extractor} at {size[0]}x{size[1]} outputs features of shape {produced}, "
            f"the head takes {wanted}: pass the --input-size the features were computed at")
    base.trainable = False
    return base


def split_off_head(model: keras.Model) -> tuple[keras.Model | None, keras.layers.Dense | None]:
    """``(the notebook model up to its head, a copy of the head)`` when its output is a ``Dense``
    layer's, else ``(None, None)``. The packaged model calls the copy (same configuration and
    weights: the notebook's arithmetic) at its top level, where the integer export can re-fit it
    to the integer base's features (``model.architecture.final_dense_layer``); a nested head could not
    be. A copy, because a layer's ``input`` is that of its first call, inside the notebook."""
    last = model.layers[-1] if model.layers else None
    if (not isinstance(last, keras.layers.Dense) or len(model.outputs) != 1
            or last.output is not model.outputs[0]):
        return None, None
    head = keras.layers.Dense.from_config(last.get_config())
    head.build(last.input.shape)
    head.set_weights(last.get_weights())
    return keras.Model(model.inputs, last.input, name=f"{model.name}_features"), head


def wrap(model: keras.Model, size: tuple[int, int], scaling: str, base: keras.Model | None,
         from_logits: bool) -> tuple[keras.Model, keras.Model, int]:
    """``(classifier, scores, units)``: float pixels in [0, 255] -> class probabilities, and the
    same before a single sigmoid unit becomes two classes."""
    pixels = keras.Input(shape=(*size, 3), dtype="float32", name="pixels")
    x = pixels
    scale = SCALINGS[scaling]()
    if scale is not None:
        x = scale(x)
    if base is not None:
        x = base(x, training=False)
    features, head = split_off_head(model)
    scores = head(features(x)) if head else model(x)
    if len(scores.shape) != 2:
        raise PackagingError(f"the model outputs shape {tuple(scores.shape)}, not one row of class "
                             "scores per image")
    units = int(scores.shape[-1])
    if from_logits:
        scores = keras.layers.Activation("sigmoid" if units == 1 else "softmax", name="from_logits")(scores)
    probabilities = SigmoidToTwoClasses(name="two_classes")(scores) if units == 1 else scores
    return keras.Model(pixels, probabilities, name="packaged"), keras.Model(pixels, scores), units


def check_outputs(scores: keras.Model, units: int, class_names: list[str], size: tuple[int, int]) -> None:
    """Class count matches, and the outputs are probabilities (not logits) on probe images."""
    if len(class_names) < 2 or len(set(class_names)) != len(class_names):
        raise PackagingError(f"need at least two distinct class names, got {class_names}")
    expected = 2 if units == 1 else units
    if len(class_names) != expected:
        raise PackagingError(
            f"the model outputs {units} value(s) per image ({expected} classes), but "
            f"{len(class_names)} class names were given: {class_names}")
    probe = reference_batch(*size, seeds=PROBE_SEEDS).astype("float32")
    values = np.asarray(scores.predict(probe, verbose=0), dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    sums = values.sum(axis=1)
    in_range = low >= -PROBABILITY_TOLERANCE and high <= 1 + PROBABILITY_TOLERANCE
    if not in_range or (units > 1 and np.max(np.abs(sums - 1)) > PROBABILITY_TOLERANCE):
        raise PackagingError(
            f"the model's outputs are not probabilities on {len(probe)} probe images (values in "
            f"[{low:.3g}, {high:.3g}], row sums in [{sums.min():.3g}, {sums.max():.3g}]): they look "
            "like logits. If its last layer has no softmax/sigmoid, pass --from-logits")


def labelled_images(flag: str, images: str, class_names: list[str]) -> LabelledImages:
    """``images`` (``--int8-images``, ``--calibration-images``) labelled in the model's class
    order; a folder whose classes are not the model's is refused, naming ``flag``."""
    try:
        return labelled_images_for(images, class_names)
    except (OSError, ValueError) as error:
        raise PackagingError(f"{flag}: {error}") from error


def int8_request(images: str, class_names: list[str]) -> Int8Request:
    """Calibration and validation halves of ``--int8-images``, whose classes must be the model's."""
    data = labelled_images("--int8-images", images, class_names)
    calibration, validation = split_train_validation(data, validation_fraction=0.5, seed=0)
    return Int8Request(calibration_paths=calibration_sample(calibration.paths, seed=0),
                       validation_paths=validation.paths, validation_labels=validation.labels,
                       calibration_source=f"{images} (seeded half)",
                       validation_source=f"{images} (the other half)",
                       head_paths=calibration.paths, head_labels=calibration.labels)


def calibration_request(images: str | None, class_names: list[str]) -> calibration.CalibrationRequest | None:
    """The temperature fit ``--calibration-images`` asks for (None without them)."""
    if not images:
        return None
    data = labelled_images("--calibration-images", images, class_names)
    return calibration.CalibrationRequest(data.paths, data.labels, images)


def package(args: argparse.Namespace):
    """Check everything, then export; returns the written ``ModelMetadata``."""
    try:
        check_export_dir(args.output)
    except ValueError as refusal:
        raise PackagingError(str(refusal)) from None
    class_names = resolve_class_names(args)
    int8 = int8_request(args.int8_images, class_names) if args.int8_images else None
    calibrate = calibration_request(args.calibration_images, class_names)
    scope = scope_request(args)
    interpolation = args.interpolation or DEFAULT_INTERPOLATION[args.loader]
    preprocessing = LOADERS[args.loader]
    if interpolation not in PREPROCESSING_VERSIONS[preprocessing]:
        raise PackagingError(f"--interpolation {interpolation} is not one of the {args.loader} loader's "
                             f"{sorted(PREPROCESSING_VERSIONS[preprocessing])}")
    scaling = args.scaling or (FEATURE_EXTRACTORS[args.feature_extractor].scaling
                               if args.feature_extractor else None)
    if scaling is None:
        raise PackagingError("--scaling is required: how the notebook scaled pixels "
                             "(1/255, tf, caffe, torch or none)")
    model, source_format, keras2_changes = load_notebook_model(args.keras)
    if not args.feature_extractor:
        check_channels(model, args.keras)
        if not args.allow_double_scaling:
            check_single_scaling(model, scaling)
    size = resolve_input_size(args, model)
    base = build_feature_extractor(args, size, model) if args.feature_extractor else None
    classifier, scores, units = wrap(model, size, scaling, base, args.from_logits)
    check_outputs(scores, units, class_names, size)

    source = os.path.abspath(args.keras)
    stem = os.path.splitext(os.path.basename(source.rstrip("/")))[0]
    version = args.model_version or f"{stem}-{datetime.datetime.now(datetime.UTC):%Y%m%dT%H%M%SZ}"
    feature_weights = weights_label(args.feature_weights)
    packaged_from = {
        "path": source, "format": source_format,
        "sha256": file_sha256(source) if os.path.isfile(source) else None,
        "loader": args.loader, "interpolation": interpolation, "scaling": scaling,
        "double_scaling_allowed": args.allow_double_scaling,
        "output": "sigmoid" if units == 1 else "softmax", "from_logits": args.from_logits,
        "feature_extractor": args.feature_extractor,
        "feature_weights": feature_weights if args.feature_extractor else None,
        "keras2_translations": keras2_changes,
    }
    return export_model(
        classifier, args.output, class_names=class_names,
        base=args.feature_extractor or "notebook", base_weights=feature_weights if base else "notebook",
        model_version=version, resize_method=interpolation, preprocessing=preprocessing,
        training={"packaged_from": packaged_from}, save_keras=source_format != "saved_model",
        int8=int8, scope=scope, calibration=calibrate)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Keras 3 calls a nested model built from a legacy config (Teachable Machine's head) with its
    # one input in a list, and warns at every call that the structure differs: same values.
    warnings.filterwarnings("ignore", category=UserWarning,
                            message="The structure of `inputs` doesn't match the expected structure")
    args = parse_args(argv)
    try:
        metadata = package(args)
    except PackagingError as refusal:
        print(f"petscore: refused before writing anything: {refusal}", file=sys.stderr)
        return 1
    origin = metadata.training["packaged_from"]
    print(f"packaged {args.keras} as {metadata.model_version} -> {args.output}: "
          f"{len(metadata.class_names)} classes {metadata.class_names[:5]}"
          f"{' ...' if len(metadata.class_names) > 5 else ''}, {metadata.height}x{metadata.width}, "
          f"loader {origin['loader']} ({metadata.resize_method}), scaling {origin['scaling']}, "
          f"model.tflite {'kept' if metadata.tflite else 'not exported'}")
    if metadata.calibration:
        print(calibration.describe(metadata.calibration))
    if metadata.out_of_scope:
        print(out_of_scope.describe(metadata.out_of_scope))
    if metadata.tflite_int8:
        print(describe_int8(metadata.tflite_int8))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
