"""The out-of-scope detector: fitted and stored at export, computed inside every float artefact
alike, covered by the reference predictions, measured by ``model.evaluate --out-of-scope``; models
exported without one score as before."""

from __future__ import annotations

import dataclasses
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from model import evaluate
from model.architecture import KnnCosineDistance
from model.data import find_labelled_images, split_train_validation
from model.export import export_model
from model.out_of_scope import DEFAULT_K, load_classifier, model_features
from serving.metadata import METADATA_FILE, ModelContractError, ModelMetadata, read_metadata
from serving.reference import reference_batch
from serving.runtimes import ServingModel
from tests.conftest import TINY_SIZE
from tests.model.test_train_export import FLOAT_RUNTIMES_AGREE

SPLIT_SEED = 42  # model.train's default --seed, which the trained fixture keeps


def write_other_things(folder: str, count: int = 12) -> list[str]:
    """Generated images of nothing the model was trained on: noise, flat colours, checkerboards."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(7)
    y, x = np.mgrid[:48, :48]
    paths = []
    for i in range(count):
        if i % 3 == 0:
            pixels = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
        elif i % 3 == 1:
            pixels = np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), (48, 48, 3))
        else:
            checker = ((x // 6 + y // 6) % 2) * 255
            pixels = np.stack([checker, np.full_like(x, 200), x * 5], -1).astype(np.uint8)
        paths.append(os.path.join(folder, f"other.{i}.jpg"))
        Image.fromarray(np.ascontiguousarray(pixels)).save(paths[-1], quality=90)
    with open(os.path.join(folder, "SOURCES.csv"), "w") as handle:  # not an image: ignored
        handle.write("file\n")
    return paths


@pytest.fixture(scope="module")
def plain(trained, tmp_path_factory) -> dict:
    """The tiny trained model exported again without a detector, as every model was before it."""
    model_dir = str(tmp_path_factory.mktemp("plain") / "model")
    metadata = export_model(load_classifier(trained["model_dir"]), model_dir, class_names=["cat", "dog"],
                            base="mobilenet", base_weights="none", model_version="tiny-plain")
    return {"model_dir": model_dir, "metadata": metadata}


def test_knn_cosine_distance_is_one_minus_the_kth_highest_cosine_similarity(tmp_path):
    bank = np.eye(4, dtype=np.float32)[:, [0, 1, 1, 2]]  # unit vectors: e0, e1 twice, e2
    layer = KnnCosineDistance(bank_size=4, k=2, name="scope_score")
    features = keras.Input((4,))
    model = keras.Model(features, layer(features))
    layer.bank.assign(bank)
    probe = np.array([[0, 5, 0, 0],      # e1 twice in the bank: 2nd nearest at distance 0
                      [3, 0, 0, 0],      # e0 once: 2nd nearest is orthogonal, distance 1
                      [1, 1, 0, 0],      # 45 degrees from e0 and e1
                      [0, 0, 0, 0]], np.float32)  # no features at all: nothing near, distance 1
    want = np.array([0.0, 1.0, 1 - np.sqrt(0.5), 1.0])
    np.testing.assert_allclose(model.predict(probe, verbose=0), want, atol=1e-6)
    model.save(tmp_path / "knn.keras")
    loaded = keras.saving.load_model(tmp_path / "knn.keras", safe_mode=True)
    np.testing.assert_allclose(loaded.predict(probe, verbose=0), want, atol=1e-6)
    with pytest.raises(ValueError, match="k must be in"):
        KnnCosineDistance(bank_size=3, k=4)


def test_export_fits_the_detector_on_the_training_split_and_its_threshold_on_the_validation_split(
        trained, labelled_images):
    metadata = read_metadata(trained["model_dir"])
    scope = metadata.out_of_scope
    train, validation = split_train_validation(find_labelled_images(labelled_images), 0.2, SPLIT_SEED)
    assert (scope["method"], scope["k"], scope["share"], scope["output"]) == ("knn-cosine", DEFAULT_K, 0.01,
                                                                              "scope_score")
    assert scope["bank_images"] == scope["fit"]["images"] == len(train.paths) == 38
    assert scope["held_out"]["images"] == len(validation.paths) == 10
    # The score, computed independently: cosine distance to the k-th nearest training image.
    classifier = load_classifier(trained["model_dir"])
    _, bank = model_features(classifier, train.paths, metadata)
    _, held_out = model_features(classifier, validation.paths, metadata)
    unit = [f / np.linalg.norm(f, axis=1, keepdims=True) for f in (bank, held_out)]
    want = 1 - np.sort(unit[1] @ unit[0].T, axis=1)[:, -DEFAULT_K]
    scores = _scores(trained["model_dir"], metadata, validation.paths)
    np.testing.assert_allclose(scores, want, atol=1e-5)
    # 1% of 10 held-out images is none: the threshold is their highest score, and flags none.
    assert scope["threshold"] == pytest.approx(scores.max(), abs=1e-6)
    assert scope["held_out"]["flagged"] == 0.0 and scope["held_out"]["max"] == pytest.approx(scores.max())
    assert scope["held_out"]["p50"] <= scope["held_out"]["p90"] <= scope["held_out"]["max"]


def _scores(model_dir: str, metadata: ModelMetadata, paths: list[str],
            runtime: str = "saved_model") -> np.ndarray:
    from model.data import readable_batches

    model = ServingModel(model_dir, metadata, runtime)
    return np.concatenate([model.predict_outputs(pixels).scope_score
                           for _, pixels in readable_batches(paths, metadata, 64, "test")])


def test_the_scope_score_is_equal_on_the_saved_model_litert_and_keras(trained):
    metadata = read_metadata(trained["model_dir"])
    images = reference_batch(TINY_SIZE, TINY_SIZE, seeds=range(40, 51))  # 11: LiteRT pads its last invoke
    saved = ServingModel(trained["model_dir"], metadata, runtime="saved_model").predict_outputs(images)
    tflite = ServingModel(trained["model_dir"], metadata, runtime="tflite").predict_outputs(images)
    served = keras.saving.load_model(os.path.join(trained["model_dir"], "model.keras"), safe_mode=True)
    on_keras = served.predict(images.astype("float32"), verbose=0)
    assert saved.scope_score.shape == (11,) and saved.scope_score.dtype == np.float32
    assert np.ptp(saved.scope_score) > 1e-4, "every image scored alike"
    for other in (tflite.scope_score, on_keras["scope_score"]):
        np.testing.assert_allclose(other, saved.scope_score, atol=FLOAT_RUNTIMES_AGREE)
    for other in (tflite.probabilities, on_keras["probabilities"]):
        np.testing.assert_allclose(other, saved.probabilities, atol=FLOAT_RUNTIMES_AGREE)
    assert metadata.tflite["max_abs_diff_vs_saved_model"] <= 1e-4  # the export checked both outputs



def test_litert_lists_the_probabilities_first_as_every_earlier_scorer_reads_them(trained):
    """Scorers before the detector take model.tflite's output 0: with the probabilities there,
    an older worker scores a model with a detector as before."""
    from ai_edge_litert.interpreter import Interpreter

    from serving.runtimes import litert_predict

    interpreter = Interpreter(model_path=os.path.join(trained["model_dir"], "model.tflite"))
    assert interpreter.get_signature_list()["serving_default"]["outputs"] == ["probabilities", "scope_score"]
    images = reference_batch(TINY_SIZE, TINY_SIZE)
    first = litert_predict(interpreter)(images)[0]  # output 0, as scorers before the detector read it
    references = read_metadata(trained["model_dir"]).reference_predictions
    want = np.array([ref["probabilities"] for ref in references])
    np.testing.assert_allclose(first, want, atol=FLOAT_RUNTIMES_AGREE)


@pytest.mark.parametrize("runtime", ["saved_model", "tflite"])
def test_reference_predictions_cover_the_scope_score(trained, runtime):
    metadata = read_metadata(trained["model_dir"])
    assert all(isinstance(ref["scope_score"], float) for ref in metadata.reference_predictions)
    assert ServingModel(trained["model_dir"], metadata, runtime).check_reference_predictions() < 1e-4
    moved = [dict(ref, scope_score=ref["scope_score"] + 0.01) for ref in metadata.reference_predictions]
    tampered = dataclasses.replace(metadata, reference_predictions=moved)
    with pytest.raises(ModelContractError, match="reference scope_scores differ"):
        ServingModel(trained["model_dir"], tampered, runtime).check_reference_predictions()


def test_a_model_exported_without_a_detector_still_loads_and_scores(trained, plain):
    model_dir = plain["model_dir"]
    fields = json.loads(open(os.path.join(model_dir, METADATA_FILE)).read())
    assert fields["out_of_scope"] is None
    assert all("scope_score" not in ref for ref in fields["reference_predictions"])
    del fields["out_of_scope"]  # a metadata.json written before the field existed
    old = ModelMetadata.from_json(json.dumps(fields))
    signature = tf.saved_model.load(os.path.join(model_dir, "saved_model")).signatures["serving_default"]
    assert set(signature.structured_outputs) == {"probabilities"}
    images = reference_batch(TINY_SIZE, TINY_SIZE, seeds=range(60, 66))
    with_detector = ServingModel(trained["model_dir"], read_metadata(trained["model_dir"]), "saved_model")
    for runtime in ("saved_model", "tflite"):
        model = ServingModel(model_dir, old, runtime)
        assert not model.has_scope_score
        outputs = model.predict_outputs(images)
        assert outputs.scope_score is None
        np.testing.assert_allclose(outputs.probabilities, model.predict(images))
        np.testing.assert_allclose(outputs.probabilities, with_detector.predict(images),
                                   atol=FLOAT_RUNTIMES_AGREE)
        assert model.check_reference_predictions() < FLOAT_RUNTIMES_AGREE


@pytest.mark.parametrize("runtime", ["saved_model", "tflite", "keras"])
def test_metadata_promising_a_detector_the_model_lacks_is_refused(trained, plain, runtime):
    detector = read_metadata(trained["model_dir"]).out_of_scope
    promised = dataclasses.replace(plain["metadata"], out_of_scope=detector)
    with pytest.raises(ModelContractError, match="no output 'scope_score': the metadata describes"):
        ServingModel(plain["model_dir"], promised, runtime)


@pytest.mark.parametrize("change, message", [
    (lambda m: m["out_of_scope"].update(method="isolation-forest"), "'isolation-forest' is none of"),
    (lambda m: m["out_of_scope"].update(threshold=None), "threshold must be a finite number"),
    (lambda m: m["out_of_scope"].update(threshold=float("nan")), "threshold must be a finite number"),
    (lambda m: m["reference_predictions"][0].pop("scope_score"), "every reference prediction needs"),
])
def test_an_inconsistent_detector_entry_is_refused(trained, change, message):
    fields = json.loads(read_metadata(trained["model_dir"]).to_json())
    change(fields)
    with pytest.raises(ModelContractError, match=message):
        ModelMetadata.from_json(json.dumps(fields))


def test_evaluate_reports_the_auroc_and_the_shares_flagged_at_the_models_threshold(
        trained, labelled_images, tmp_path):
    others = write_other_things(str(tmp_path / "others"))
    out = tmp_path / "eval"
    assert evaluate.main(["--model-dir", trained["model_dir"], "--data", labelled_images,
                          "--output", str(out), "--out-of-scope", str(tmp_path / "others")]) == 0
    figures = json.loads((out / "metrics.json").read_text())["out_of_scope"]
    metadata = read_metadata(trained["model_dir"])
    # What evaluate scores with: the auto runtime (LiteRT on this CPU).
    inside = _scores(trained["model_dir"], metadata, find_labelled_images(labelled_images).paths, "auto")
    outside = _scores(trained["model_dir"], metadata, others, "auto")
    pairs = outside[:, None] - inside[None, :]
    assert (figures["images"], figures["in_scope_images"], figures["unreadable"]) == (12, 48, 0)
    assert figures["auroc"] == pytest.approx((np.sum(pairs > 0) + 0.5 * np.sum(pairs == 0)) / pairs.size,
                                             abs=1e-5)
    threshold = metadata.out_of_scope["threshold"]
    assert figures["threshold"] == threshold
    assert figures["in_scope_flagged"] == pytest.approx(np.mean(inside > threshold), abs=1e-6)
    assert figures["out_of_scope_flagged"] == pytest.approx(np.mean(outside > threshold), abs=1e-6)
    html = (out / "report.html").read_text()
    assert "<h2>Out of scope</h2>" in html
    assert html.count("data:image/png;base64,") == 5  # 3 as before + distributions + ROC curve


def test_evaluate_refuses_out_of_scope_images_for_a_model_without_a_detector(plain, labelled_images,
                                                                             tmp_path):
    with pytest.raises(ValueError, match="has no out-of-scope detector"):
        evaluate.main(["--model-dir", plain["model_dir"], "--data", labelled_images,
                       "--output", str(tmp_path / "eval"), "--out-of-scope", str(tmp_path)])
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("overrides, message", [
    ({"out_of_scope_share": 1.5}, r"--out-of-scope-share must be in \[0, 1\)"),
    ({"out_of_scope_k": 39}, r"--out-of-scope-k must be in \[1, 38\]"),
    ({"out_of_scope_bank": 0}, "--out-of-scope-bank must be at least 1"),
])
def test_train_refuses_an_impossible_detector_before_training(labelled_images, tmp_path, overrides,
                                                              message):
    from model.train import train
    from tests.conftest import tiny_training_args

    with pytest.raises(ValueError, match=message):
        train(tiny_training_args(labelled_images, str(tmp_path / "m"), **overrides))
    assert not os.listdir(tmp_path)
