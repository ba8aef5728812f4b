"""Transient failures are retried by the runner, never recorded as bad images or duplicated.

Beam's BundleBasedDirectRunner retries a failed bundle (as Dataflow does), so these tests inject
one failure and check that the outputs are still complete, with exactly one row per input.
"""

import os
from collections import Counter

from apache_beam.io.filesystems import FileSystems

from pipeline import score
from serving.runtimes import ServingModel
from tests.corpus import GOOD
from tests.pipeline.outputs import read_run


def fail_once(monkeypatch, owner, name: str, error: Exception, when=lambda *args, **kwargs: True):
    """Make ``owner.name`` raise ``error`` the first time ``when`` holds, then behave normally."""
    original = getattr(owner, name)
    failures = []

    def flaky(*args, **kwargs):
        if not failures and when(*args, **kwargs):
            failures.append(error)
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, flaky)
    return failures


def run_and_read(corpus_root, model_dir, output):
    summary = score.run(["--input", os.path.join(corpus_root, "*"), "--model-dir", model_dir,
                         "--output", output, "--runner", "BundleBasedDirectRunner", "--max-error-rate", "1"])
    return summary, read_run(output)


def assert_complete_without_duplicates(summary, run, expected):
    good = sum(outcome == GOOD for outcome in expected.values())
    paths = Counter(run["predictions"].column("path").to_pylist())
    assert len(paths) == good and set(paths.values()) == {1}
    assert run["errors"].num_rows == len(expected) - good
    assert "ConnectionResetError" not in run["errors"].column("error_type").to_pylist()
    assert summary["accounted"] is True and summary["predictions"] == good


def test_a_storage_error_is_retried_not_recorded(corpus, trained, tmp_path, monkeypatch):
    root, expected = corpus
    failures = fail_once(monkeypatch, FileSystems, "open", ConnectionResetError("storage hiccup"),
                         when=lambda path, *a, **k: path.endswith("5.jpg"))
    summary, run = run_and_read(root, trained["model_dir"], str(tmp_path / "out"))
    assert len(failures) == 1
    assert_complete_without_duplicates(summary, run, expected)


def test_an_inference_error_is_retried_not_recorded(corpus, trained, tmp_path, monkeypatch):
    root, expected = corpus
    failures = fail_once(monkeypatch, ServingModel, "predict_outputs", ConnectionResetError("device hiccup"),
                         when=lambda self, images, **tta: self.runtime == "tflite")
    # The start-up check predicts too; let the injected failure reach a worker's batch instead.
    monkeypatch.setattr(ServingModel, "check_reference_predictions", lambda self: 0.0)
    summary, run = run_and_read(root, trained["model_dir"], str(tmp_path / "out"))
    assert len(failures) == 1
    assert_complete_without_duplicates(summary, run, expected)
