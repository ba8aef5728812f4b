"""Out-of-scope detectors measured on a model's own features: which score separates in-scope
photos from photos of other things, and what it would cost inside the exported model.

    .venv/bin/python bench/out_of_scope.py --model-dir MODEL --held-out PETS_NOT_TRAINED_ON \
        --out-of-scope ../shared/data/out-of-scope [--output bench_output/out_of_scope.json]

Features: the input of the model's final Dense layer (``model.keras``), computed through the
model's own preprocessing for its training split and its validation split (recomputed from
``metadata.json``'s training data and seed with ``--validation-fraction``, as ``model.train``
split them), for ``--held-out`` (labelled in-scope images the model never saw) and for
``--out-of-scope``. Candidates, each a score that is higher out of scope:
  msp                1 - the top class probability: the classifier's own confidence
  energy             -logsumexp(logits) of the final Dense layer (Liu et al., NeurIPS 2020)
  knn-cos k=K        cosine distance to the K-th nearest training image (Sun et al., ICML 2022),
                     for each of --ks over every training image, and with --bank-sizes seeded
                     subsamples of them at k=--bank-k
  mahalanobis-X      the smallest Mahalanobis distance to a class mean under one covariance shared
                     by the classes (Lee et al., NeurIPS 2018), X = empirical, lw (Ledoit-Wolf
                     shrinkage) or oas (Oracle Approximating Shrinkage), scikit-learn's estimators
For each: the AUROC between held-out and out-of-scope images (model.metrics.auroc, the
Mann-Whitney statistic; scikit-learn's roc_auc_score must agree), the threshold that flags
--share of the validation split (model.metrics.threshold_for_share, as the export sets it), the
shares of held-out and out-of-scope images it flags, and what the score adds to the model: floats
stored and multiply-adds per image (the alpha 0.25 MobileNet itself: 41 M multiply-adds at 224 px
and 0.2 M weights without its top, Howard et al. 2017).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model.architecture import final_dense_layer  # noqa: E402
from model.data import find_labelled_images, split_train_validation  # noqa: E402
from model.metrics import auroc, flagged_share, threshold_for_share  # noqa: E402
from model.out_of_scope import image_paths, knn_bank, load_classifier, model_features  # noqa: E402
from serving.metadata import read_metadata  # noqa: E402


def knn_scores(bank: np.ndarray, features: np.ndarray, k: int) -> np.ndarray:
    """Cosine distance to the k-th nearest bank column, as ``KnnCosineDistance`` computes it."""
    unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-7)
    similarity = unit @ bank
    return 1.0 - np.sort(similarity, axis=1)[:, -k]


def mahalanobis_scorer(features: np.ndarray, labels: np.ndarray, estimator):
    """Min over classes of the squared Mahalanobis distance to the class mean, one covariance
    (``estimator``, fitted on the class-centred features) shared by the classes."""
    means = np.stack([features[labels == c].mean(axis=0) for c in np.unique(labels)])
    precision = estimator.fit(features - means[labels]).precision_

    def score(x: np.ndarray) -> np.ndarray:
        centred = x[:, None, :] - means[None]
        return np.einsum("ncd,de,nce->nc", centred, precision, centred).min(axis=1)

    return score


def main() -> int:
    from scipy.special import logsumexp
    from sklearn.covariance import OAS, EmpiricalCovariance, LedoitWolf
    from sklearn.metrics import roc_auc_score

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--held-out", required=True, help="Labelled in-scope images the model never saw.")
    parser.add_argument("--out-of-scope", required=True, help="Images of other things (any files under it).")
    parser.add_argument("--validation-fraction", type=float, default=0.2)
    parser.add_argument("--share", type=float, default=0.01)
    parser.add_argument("--ks", default="1,5,10,20,50")
    parser.add_argument("--bank-sizes", default="250,500,1000",
                        help="Seeded subsamples of the training images as smaller banks ('' for none).")
    parser.add_argument("--bank-k", type=int, default=10)
    parser.add_argument("--output", default=None, help="Also write the figures here as JSON.")
    args = parser.parse_args()
    bank_sizes = [int(size) for size in args.bank_sizes.split(",") if size]
    if any(size < args.bank_k for size in bank_sizes):
        parser.error(f"--bank-sizes must be at least --bank-k ({args.bank_k}), got {bank_sizes}")

    metadata = read_metadata(args.model_dir)
    classifier = load_classifier(args.model_dir)
    training = find_labelled_images(metadata.training["data"])
    train, validation = split_train_validation(training, args.validation_fraction, metadata.training["seed"])
    held_out = find_labelled_images(args.held_out)
    sets = {"train": train.paths, "validation": validation.paths, "held_out": held_out.paths,
            "out_of_scope": image_paths(args.out_of_scope)}
    read = {name: model_features(classifier, paths, metadata) for name, paths in sets.items()}
    features = {name: values for name, (_, values) in read.items()}
    print("images: " + ", ".join(f"{name} {len(f)}" for name, f in features.items()), flush=True)
    dense = final_dense_layer(classifier)
    kernel, bias = (np.asarray(w, np.float64) for w in dense.get_weights())
    dim, classes = kernel.shape
    labels = np.asarray(train.labels)[read["train"][0]]

    def logits(x):
        return x @ kernel + bias

    def softmax(z):
        return np.exp(z - logsumexp(z, axis=1, keepdims=True))

    candidates = {
        "msp": (lambda x: 1.0 - softmax(logits(x)).max(axis=1), 0, 0),
        "energy": (lambda x: -logsumexp(logits(x), axis=1), 0, 0),
    }
    full_bank = knn_bank(features["train"], len(features["train"]), seed=0)
    for k in [int(k) for k in args.ks.split(",")]:
        candidates[f"knn-cos k={k} bank={full_bank.shape[1]}"] = (
            lambda x, k=k: knn_scores(full_bank, x, k), dim * full_bank.shape[1], dim * full_bank.shape[1])
    for size in bank_sizes:
        if size < full_bank.shape[1]:
            bank = knn_bank(features["train"], size, seed=0)
            candidates[f"knn-cos k={args.bank_k} bank={size}"] = (
                lambda x, bank=bank: knn_scores(bank, x, args.bank_k), dim * size, dim * size)
    for name, estimator in [("empirical", EmpiricalCovariance()), ("lw", LedoitWolf()), ("oas", OAS())]:
        scorer = mahalanobis_scorer(features["train"].astype(np.float64), labels, estimator)
        # Inside a model: project by a Cholesky factor of the precision (dim x dim), then squared
        # distances to each projected class mean.
        candidates[f"mahalanobis-{name}"] = (scorer, dim * dim + classes * dim, dim * dim + classes * dim)

    rows = []
    print(f"{'candidate':28s} {'AUROC':>7s} {'sklearn':>7s} {'threshold':>10s} {'held-out':>8s} "
          f"{'out':>7s} {'floats':>8s} {'MACs':>8s}")
    for name, (score, floats, macs) in candidates.items():
        scores = {key: np.asarray(score(x.astype(np.float64)), np.float64) for key, x in features.items()}
        threshold = threshold_for_share(scores["validation"], args.share)
        area = auroc(scores["held_out"], scores["out_of_scope"])
        check = roc_auc_score(np.r_[np.zeros(len(scores["held_out"])), np.ones(len(scores["out_of_scope"]))],
                              np.r_[scores["held_out"], scores["out_of_scope"]])
        assert abs(area - check) < 1e-9, (area, check)
        row = {"candidate": name, "auroc": round(area, 4), "threshold": threshold,
               "held_out_flagged": round(flagged_share(scores["held_out"], threshold), 4),
               "out_of_scope_flagged": round(flagged_share(scores["out_of_scope"], threshold), 4),
               "validation_flagged": round(flagged_share(scores["validation"], threshold), 4),
               "stored_floats": floats, "multiply_adds": macs}
        rows.append(row)
        print(f"{name:28s} {area:7.4f} {check:7.4f} {threshold:10.4g} {row['held_out_flagged']:8.2%} "
              f"{row['out_of_scope_flagged']:7.2%} {floats:8d} {macs:8d}", flush=True)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as handle:
            json.dump({"model_dir": os.path.abspath(args.model_dir), "share": args.share,
                       "images": {name: len(f) for name, f in features.items()}, "rows": rows},
                      handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
