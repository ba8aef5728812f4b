"""Entry point: ``python -m pipeline.score --input 'images/*.jpg' --model-dir M --output OUT``.

Checks everything that can be checked before work starts (the model honours its contract, the
input is not empty, the output prefix is free), wires the stages together, runs the pipeline on
the chosen runner (locally Beam's FnApiRunner, the DirectRunner's batch engine, by default) and
reports the run summary.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import logging
import os
import sys
import time
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import (
    DirectOptions,
    GoogleCloudOptions,
    PipelineOptions,
    SetupOptions,
    StandardOptions,
    WorkerOptions,
)
from apache_beam.portability.api import beam_provision_api_pb2
from apache_beam.runners.portability.fn_api_runner import fn_runner
from apache_beam.runners.portability.portable_runner import JobServiceHandle
from apache_beam.runners.runner import PipelineRunner

from pipeline import progress
from pipeline.decode import CHALLENGER_ERRORS, DECODED, ERRORS, DecodeImages, DecodeSpec
from pipeline.incremental import SkipScored, earlier_scored_files
from pipeline.inference import CHALLENGER, PAIRS, PREDICTIONS, ChallengerModel, ScoreImages
from pipeline.listing import directory_glob, fixed_prefix
from pipeline.options import (
    RUN_DATE_PLACEHOLDER,
    ScoreOptions,
    ThreadBudget,
    parse_resource_hints,
    refuse_unknown_flags,
    resolve_run_date,
    thread_budget,
)
from pipeline.progress import ReportProgress
from pipeline.read import INPUT_COUNT, SKIPPED, UNSCORED, ReadImagePaths, check_input_exists
from pipeline.report import earlier_records, review_paths
from pipeline.rows import ERROR_SCHEMA, default_top_k, prediction_schema, probability_column
from pipeline.summary import ReportSettings, WriteRunSummary
from pipeline.write import (
    BINARY,
    CHALLENGER_DIR,
    CSV_PARTS_DIR,
    ERRORS_DIR,
    PREDICTIONS_DIR,
    REPORT_NAME,
    WriteKaggleCsv,
    WriteParquetTables,
    delete_with_directories,
    find_run_files,
    output_paths,
    resolve_csv_format,
    run_directories,
)
from serving.faces import FaceDetector
from serving.metadata import (
    INT8_TFLITE_FILE,
    KERAS_FILE,
    TFLITE_FILE,
    ModelContractError,
    ModelMetadata,
    file_sha256,
    read_metadata,
    saved_model_sha256,
)
from serving.runtimes import ServingModel

_LOG = logging.getLogger("petscore")
EXIT_TOO_MANY_ERRORS = 3
EXIT_DRIFT = 4
EXIT_DISAGREEMENT = 5


def local_runner(pipeline_options: PipelineOptions) -> PipelineRunner | None:
    """Beam's FnApiRunner, the DirectRunner's batch engine, when the DirectRunner is asked for
    (or no runner is); ``None`` (the named runner) otherwise.

    Beam 2.77's DirectRunner first downloads the Prism runner from GitHub and runs there,
    falling back to the FnApiRunner only when that fails. So a connected laptop would run on
    another runner than an offline machine or CI does (one that ignores --direct_running_mode),
    fetching an executable at run time, and offline the attempt costs every run about a second.
    ``--runner PrismRunner`` still runs on Prism. The provision info hands the pipeline options
    to multi-processing workers, as the DirectRunner does.
    """
    runner = pipeline_options.view_as(StandardOptions).runner or "DirectRunner"
    if not isinstance(runner, str) or runner.lower() not in ("directrunner", "direct"):
        return None
    options = JobServiceHandle.encode_pipeline_options(pipeline_options.get_all_options())
    provision = beam_provision_api_pb2.ProvisionInfo(pipeline_options=options)
    return fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(provision))


class OutputExistsError(FileExistsError):
    """The output prefix already holds a run's outputs and --overwrite was not given."""


def load_checked_model(model_dir: str, runtime: str) -> ModelMetadata:
    """Read the metadata, verify every artifact's hash and re-predict the reference images with
    the runtime this machine would use, before any work starts.

    Workers repeat the reference check with the runtime they pick when they load the model
    (a GPU worker may pick another runtime than this machine), so no worker scores with a
    model that does not reproduce its export.
    """
    metadata = read_metadata(model_dir)
    hashes = {"saved_model/": (saved_model_sha256(model_dir), metadata.sha256)}
    if metadata.tflite:
        hashes[TFLITE_FILE] = (file_sha256(FileSystems.join(model_dir, TFLITE_FILE)),
                               metadata.tflite["sha256"])
    keras_file = FileSystems.join(model_dir, KERAS_FILE)
    if metadata.keras and FileSystems.exists(keras_file):  # --runtime keras refuses a missing one
        hashes[KERAS_FILE] = (file_sha256(keras_file), metadata.keras["sha256"])
    if metadata.int8_kept:
        hashes[INT8_TFLITE_FILE] = (file_sha256(FileSystems.join(model_dir, INT8_TFLITE_FILE)),
                                    metadata.tflite_int8["sha256"])
    for name, (actual, promised) in hashes.items():
        if actual != promised:
            raise ModelContractError(f"{model_dir}: {name} hashes to {actual}, metadata.json says "
                                     f"{promised}; the model was changed after export")
    ServingModel(model_dir, metadata, runtime).check_reference_predictions()
    return metadata


def check_output(output: str, overwrite: bool) -> list[str]:
    """Refuse an output prefix that is a local file, or that holds an earlier run's files when
    ``overwrite`` is not given (``OutputExistsError``, one line); return those files."""
    if FileSystems.get_scheme(output) in (None, "file") and os.path.isfile(output):
        raise OutputExistsError(f"--output {output} is a file: give a directory (a prefix) for "
                                "the run's outputs")
    found = find_run_files(output)
    if not found or overwrite:
        return found
    record = output_paths(output)["summary"]
    examples = ", ".join(path.removeprefix(output.rstrip("/") + "/") for path in found[:3])
    if record in found:
        raise OutputExistsError(
            f"{output} already holds a complete run (summary.json and {len(found) - 1} more files); "
            "pass --overwrite to replace it or choose another --output")
    raise OutputExistsError(
        f"{output} holds {len(found)} files of an incomplete run ({examples}, ...) and no "
        "summary.json: a run was killed there, or one is still writing; readers must not "
        "trust them. If no job is writing there, rerun with --overwrite: it deletes them "
        "before scoring again")


def delete_run_files(output: str, found: list[str]) -> None:
    """Delete ``found``, what an earlier run or a killed attempt left under ``output``
    (``check_output`` with ``overwrite``), its completion record first."""
    if not found:
        return
    record = output_paths(output)["summary"]
    _LOG.info("--overwrite: deleting %d files a %s run left under %s", len(found),
              "complete" if record in found else "killed (incomplete)", output)
    if record in found:
        FileSystems.delete([record])  # a reader must never see a record listing deleted files
    delete_with_directories([path for path in found if path != record], run_directories(output))


def input_prefix(options: ScoreOptions) -> str:
    """What every input path of this run starts with ('' for a manifest: anything)."""
    return fixed_prefix(options.input) if options.input else ""


def build_pipeline(pipeline: beam.Pipeline, options: ScoreOptions, metadata: ModelMetadata,
                   run_id: str, started: float, inference_hints: dict[str, str],
                   scored_files: list[str] = (), earlier: list[dict] = (),
                   report_progress: bool = False, threads: ThreadBudget | None = None,
                   challenger: ModelMetadata | None = None) -> None:
    """Wire read -> decode -> score -> write, as in the architecture diagram; every element from
    the listing to the sinks is a batch (a list of paths, an ``ImageBatch``, an Arrow table).
    ``scored_files``: earlier predictions files --skip-scored found
    (``incremental.earlier_scored_files``); ``earlier``: records of the runs --compare-to found
    (``report.earlier_records``); ``threads``: the worker processes' thread budget;
    ``challenger``: the contract of --challenger-model, scored in the same pass."""
    paths = output_paths(options.output)
    listed = pipeline | "ReadImagePaths" >> ReadImagePaths(
        options.input, options.manifest, run_id, batch_size=options.batch_size,
        csv_format=options.csv_format)
    tonight_prefix = input_prefix(options)
    scope_threshold = out_of_scope_threshold(options, metadata)
    challenger_model = challenger and ChallengerModel(options.challenger_model, challenger,
                                                      out_of_scope_threshold(options, challenger))
    unscored = listed["paths"] | "SkipScored" >> SkipScored(list(scored_files), tonight_prefix,
                                                           options.batch_size)
    decoded = unscored["images"] | "DecodeImages" >> DecodeImages(
        metadata.input_size, metadata.resize_method, options.max_image_pixels,
        options.max_image_bytes, run_id, threads or ThreadBudget(), preprocessing=metadata.preprocessing,
        challenger=challenger and other_decoding(metadata, challenger),
        max_jpeg_scans=options.max_jpeg_scans, max_decode_seconds=options.max_decode_seconds)
    skipped_parts = (listed[SKIPPED], unscored[SKIPPED], decoded[SKIPPED])
    skipped = skipped_parts | "AllSkipped" >> beam.Flatten()
    scored = decoded[DECODED] | "ScoreImages" >> ScoreImages(
        options.model_dir, metadata, min_confidence=options.min_confidence, run_id=run_id,
        share_model_across_processes=options.share_model_across_processes,
        runtime=options.runtime, threads=threads, tflite_invoke_batch=options.tflite_invoke_batch,
        top_k=options.top_k, scope_threshold=scope_threshold, challenger=challenger_model,
        tta=options.tta, faces=options.faces,
    ).with_resource_hints(**inference_hints)
    predictions = scored[PREDICTIONS]
    error_parts = (decoded[ERRORS], listed[UNSCORED])
    errors = error_parts | "AllErrors" >> beam.Flatten()

    csv = predictions | "WriteKaggleCsv" >> WriteKaggleCsv(
        paths["csv"], FileSystems.join(options.output, CSV_PARTS_DIR), metadata.class_names,
        options.csv_format, options.positive_class, options.clip)
    prediction_files = predictions | "WritePredictions" >> WriteParquetTables(
        FileSystems.join(options.output, PREDICTIONS_DIR), "predictions",
        prediction_schema(metadata.class_names))
    error_files = errors | "WriteErrors" >> WriteParquetTables(
        FileSystems.join(options.output, ERRORS_DIR), "errors", ERROR_SCHEMA)
    written_parts = [csv["csv"], prediction_files, error_files]
    if challenger_model:
        written_parts += [
            scored[CHALLENGER] | "WriteChallengerPredictions" >> WriteParquetTables(
                FileSystems.join(options.output, CHALLENGER_DIR, PREDICTIONS_DIR),
                "challenger-predictions", prediction_schema(challenger.class_names)),
            decoded[CHALLENGER_ERRORS] | "WriteChallengerErrors" >> WriteParquetTables(
                FileSystems.join(options.output, CHALLENGER_DIR, ERRORS_DIR), "challenger-errors",
                ERROR_SCHEMA)]
    written = tuple(written_parts) | "WrittenFiles" >> beam.Flatten()
    if report_progress:
        (predictions, *error_parts, *skipped_parts) | "ReportProgress" >> ReportProgress()
    context = {"run_id": run_id, "run_date": options.run_date, "model_version": metadata.model_version,
               "model_sha256": metadata.sha256, "runtime": options.runtime,
               "input": options.input or options.manifest,
               "paths_prefix": tonight_prefix, "output": options.output,
               "class_names": list(metadata.class_names),
               "out_of_scope_threshold": scope_threshold, "tta": options.tta, "faces": options.faces}
    summary_inputs = {"written": written, "inputs": listed[INPUT_COUNT], "predictions": predictions,
                      "errors": errors, "csv_rows": csv["rows"], "skipped": skipped}
    settings = report_settings(options, metadata, earlier, scope_threshold is not None)
    if challenger_model:
        context["challenger"] = {
            "model_dir": challenger_model.model_dir, "model_version": challenger.model_version,
            "model_sha256": challenger.sha256, "out_of_scope_threshold": challenger_model.scope_threshold,
            "disagreement_limit": options.fail_on_disagreement}
        summary_inputs["pairs"] = scored[PAIRS]
        settings = dataclasses.replace(settings,
                                       challenger_scope=challenger_model.scope_threshold is not None)
    summary_inputs | "WriteRunSummary" >> WriteRunSummary(paths["summary"], started, context, settings)


def other_decoding(metadata: ModelMetadata, challenger: ModelMetadata) -> DecodeSpec | None:
    """The challenger's ``DecodeSpec`` where it differs from the model's (a second decode of each
    image), else None: both models take the same pixels."""
    spec = DecodeSpec.of(challenger)
    return None if spec == DecodeSpec.of(metadata) else spec


def report_settings(options: ScoreOptions, metadata: ModelMetadata, earlier,
                    scope: bool = False) -> ReportSettings:
    """The night is profiled by P(positive class) for two classes, by the confidence otherwise;
    ``scope``: rows carry the out-of-scope detector's score and decision."""
    two_classes = len(metadata.class_names) == 2
    return ReportSettings(
        class_names=list(metadata.class_names),
        score_column=probability_column(options.positive_class) if two_classes else "confidence",
        score_label=f"P({options.positive_class})" if two_classes else "confidence",
        review_size=options.review_size, earlier=list(earlier), scope=scope)


def out_of_scope_threshold(options: ScoreOptions, metadata: ModelMetadata) -> float | None:
    """The score above which an image's decision is ``out_of_scope``; None where nothing is
    flagged: the model has no detector, ``--out-of-scope off``, or the integer runtime (its
    quantised features carry no detector, see ``model.quantize``)."""
    if not metadata.has_scope_detector or options.out_of_scope == "off":
        return None
    if options.runtime == "tflite-int8":
        _LOG.warning("--runtime tflite-int8: the integer model carries no out-of-scope detector; "
                     "no image is flagged out_of_scope (the float runtimes flag them)")
        return None
    return float(metadata.out_of_scope["threshold"])


def resolve_date_placeholders(options: ScoreOptions) -> None:
    """Put the run date into the path flags, so one nightly schedule serves every night."""
    run_date = resolve_run_date(options.run_date)
    options.run_date = run_date
    for name in ("input", "manifest", "output"):
        value = getattr(options, name)
        if value:
            setattr(options, name, value.replace(RUN_DATE_PLACEHOLDER, run_date))


def resolve_model_dependent_options(options: ScoreOptions, metadata: ModelMetadata) -> None:
    """Defaults that depend on the model's classes: CSV format, positive class, top-k."""
    classes = metadata.class_names
    options.csv_format = resolve_csv_format(options.csv_format, classes)
    if options.positive_class is None:
        options.positive_class = "dog" if "dog" in classes else classes[1]
    if options.csv_format == BINARY and options.positive_class not in classes:
        raise ModelContractError(f"--positive-class {options.positive_class!r} is not one of the "
                                 f"model's classes {classes}")
    if options.top_k is None:
        options.top_k = default_top_k(classes)
    if not 0 <= options.top_k <= len(classes):
        raise ValueError(f"--top-k {options.top_k} must be between 0 and the model's "
                         f"{len(classes)} classes")


@dataclasses.dataclass(frozen=True)
class CheckedRun:
    """A run that passed every start-up check: what its pipeline needs."""

    pipeline_options: PipelineOptions
    options: ScoreOptions
    metadata: ModelMetadata
    run_id: str
    started: float
    inference_hints: dict[str, str]
    scored_files: list[str]
    earlier: list[dict]
    challenger: ModelMetadata | None = None


def check_challenger(options: ScoreOptions, metadata: ModelMetadata) -> ModelMetadata | None:
    """--challenger-model's contract, checked as the model's is (hashes, reference predictions
    with the same runtime); None without one. Refuses, in one line, a challenger whose classes
    are not the model's in the same order (its rows could not share the predictions schema,
    nor its decisions be compared), and --fail-on-disagreement without a challenger."""
    if options.fail_on_disagreement is not None and not options.challenger_model:
        raise ValueError("--fail-on-disagreement compares two models: give --challenger-model DIR too")
    if options.fail_on_disagreement is not None and not 0 <= options.fail_on_disagreement <= 1:
        raise ValueError(f"--fail-on-disagreement {options.fail_on_disagreement} must be a share "
                         "between 0 and 1 (e.g. 0.02)")
    if not options.challenger_model:
        return None
    challenger = load_checked_model(options.challenger_model, options.runtime)
    if list(challenger.class_names) != list(metadata.class_names):
        raise ModelContractError(
            f"--challenger-model {options.challenger_model} has classes {challenger.class_names}, the "
            f"model {metadata.class_names}: a challenger must have the same classes in the same "
            "order; compare models of other classes on labelled data instead (model.compare)")
    return challenger


def check_run(argv: list[str] | None) -> CheckedRun:
    """Every check that can be made before work starts. A refusal raises a ``ValueError`` or
    ``FileExistsError`` (subclass) whose message alone tells the user what to fix."""
    argv = sys.argv[1:] if argv is None else argv
    refuse_unknown_flags(argv)
    pipeline_options = PipelineOptions(argv)
    FileSystems.set_options(pipeline_options)  # driver-side gs:// calls use the job's auth options
    options = pipeline_options.view_as(ScoreOptions)
    if not options.model_dir or not options.output:
        raise ValueError("--model-dir and --output are required (see --help)")
    resolve_date_placeholders(options)
    started = time.time()
    run_id = options.run_id or datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    inference_hints = parse_resource_hints(options.inference_resource_hint)
    if options.review_size < 0:
        raise ValueError(f"--review-size {options.review_size} must be 0 or more")
    if options.tflite_invoke_batch < 1:
        raise ValueError(f"--tflite-invoke-batch {options.tflite_invoke_batch} must be 1 or more")
    if options.batch_size < 1:
        raise ValueError(f"--batch-size {options.batch_size} must be 1 or more")
    if options.max_jpeg_scans < 1:
        raise ValueError(f"--max-jpeg-scans {options.max_jpeg_scans} must be 1 or more")
    if not options.max_decode_seconds > 0:
        raise ValueError(f"--max-decode-seconds {options.max_decode_seconds:g} must be more than 0")
    if options.min_batch_size is not None:
        _LOG.warning("--min-batch-size has no effect since batches are made when the paths are "
                     "listed: each holds --batch-size (%d) images", options.batch_size)
    for name in ("decode_threads", "tflite_threads"):
        if getattr(options, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(options, name)} must be 0 "
                             "(sized from the cores) or more")
    if options.input and (every_file := directory_glob(options.input)):
        _LOG.info("--input %s is a directory: scoring every file under it (%s)", options.input,
                  every_file)
        options.input = every_file
    check_input_exists(options.input, options.manifest)
    leftovers = check_output(options.output, options.overwrite)  # before the model loads
    if options.input and "**" in options.input and (options.output.rstrip("/") + "/").startswith(
            input_prefix(options)):
        _LOG.warning("--output %s is under --input %s: a later run over the same input will "
                     "list this run's outputs as images; write them somewhere else",
                     options.output, options.input)
    if options.faces != "off":
        FaceDetector(threads=1)  # the package that ships it is installed, and its model loads
    metadata = load_checked_model(options.model_dir, options.runtime)
    challenger = check_challenger(options, metadata)
    resolve_model_dependent_options(options, metadata)
    scored_files = (earlier_scored_files(options.skip_scored, metadata.model_version,
                                         input_prefix(options), exclude_run=options.output)
                    if options.skip_scored else [])
    earlier = earlier_records(options.compare_to, metadata.model_version, options.output)
    delete_run_files(options.output, leftovers)  # every check passed: now --overwrite deletes
    return CheckedRun(pipeline_options, options, metadata, run_id, started, inference_hints,
                      scored_files, earlier, challenger)


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Keep what was alive before the run (imported modules, the model) out of the garbage
    collector's full passes while it runs: each pass walked all of it again, 0.1 s each, one in
    a local run of 2,000 images and two in one of 10,000. Unfrozen after, so a caller that runs
    several jobs in one process gets its garbage collected."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def execute(checked: CheckedRun) -> dict:
    """Run the checked job's pipeline; return the run summary."""
    options = checked.options
    _LOG.info("scoring %s with model %s (%s), run %s -> %s", options.input or options.manifest,
              checked.metadata.model_version, checked.metadata.base, checked.run_id, options.output)
    pipeline_options = checked.pipeline_options
    runner = local_runner(pipeline_options)
    # Local DoFns run in this process, where the progress log lives, unless multi_processing.
    report_progress = runner is not None and (
        pipeline_options.view_as(DirectOptions).direct_running_mode != "multi_processing")
    if report_progress:
        progress.start()
    try:
        with frozen_heap(), beam.Pipeline(runner=runner, options=pipeline_options) as pipeline:
            build_pipeline(pipeline, options, checked.metadata, checked.run_id, checked.started,
                           checked.inference_hints, checked.scored_files, checked.earlier,
                           report_progress=report_progress,
                           threads=thread_budget(pipeline_options, options),
                           challenger=checked.challenger)
    finally:
        progress.stop()
    summary_path = output_paths(options.output)["summary"]
    with FileSystems.open(summary_path) as handle:
        summary = json.loads(handle.read())
    headline = ("inputs", "predictions", "errors", "errors_by_type", "skipped_by_reason",
                "uncertain", "accounted", "images_per_second")
    _LOG.info("run summary (%s): %s", summary_path, json.dumps(
        {key: summary[key] for key in headline} | {"drift_alerts": summary["drift"].get("alerts", [])},
        sort_keys=True))
    if "challenger" in summary:
        block = summary["challenger"]
        _LOG.info("challenger %s: %d of %d images change decision (%s agree), %d challenger errors",
                  block["model_version"], block["flipped"], block["predictions"], block["agreement"],
                  block["errors"])
    if not summary["accounted"]:
        _LOG.error("inputs (%d) != predictions (%d) + errors (%d) + skipped (%d)", summary["inputs"],
                   summary["predictions"], summary["errors"], sum(summary["skipped_by_reason"].values()))
    if options.csv_format == BINARY and summary["csv_rows"] < summary["predictions"]:
        _LOG.info("%d of %d predictions are not in submission.csv: their file names are not "
                  "integers (Kaggle's ids, e.g. 123.jpg); every one is in predictions/",
                  summary["predictions"] - summary["csv_rows"], summary["predictions"])
    return summary


def run(argv: list[str] | None = None) -> dict:
    """Run the job; return the run summary. Raises before any work when inputs are wrong."""
    return execute(check_run(argv))


def print_help() -> None:
    """``--help``: petscore's flags and the Beam runner options users reach for most."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.score", description=__doc__,
        usage="%(prog)s (--input GLOB | --manifest FILE) --model-dir DIR --output PREFIX [options]",
        epilog="Every other Apache Beam pipeline option passes through to the runner as well.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    for title, options_class in (("petscore", ScoreOptions), ("runner", StandardOptions),
                                 ("local runs (DirectRunner)", DirectOptions),
                                 ("Google Cloud / Dataflow", GoogleCloudOptions),
                                 ("Dataflow workers", WorkerOptions), ("packaging", SetupOptions)):
        options_class._add_argparse_args(parser.add_argument_group(title))
    parser.print_help()


def main(argv: list[str] | None = None) -> int:
    """Console entry point: exit 1 refused before any work, 3 error rate above --max-error-rate,
    4 drift alert with --fail-on-drift, 5 challenger disagreement above --fail-on-disagreement
    (the lowest code wins when several apply), else 0."""
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print_help()
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("apache_beam").setLevel(logging.WARNING)  # keep our progress lines readable
    try:
        checked = check_run(argv)
    except (ValueError, FileExistsError) as refusal:  # one line, no traceback: nothing ran yet
        print(f"petscore: refused before any work: {refusal}", file=sys.stderr)
        return 1
    summary = execute(checked)
    options = checked.options
    print(f"outputs under {summary['output']}:")
    for name, path in output_paths(summary["output"]).items():
        print(f"  {name:12s} {path}")
    print(f"  {'review':12s} {review_paths(summary['output'])['csv']} (and .parquet)")
    print(f"  {'report':12s} {FileSystems.join(summary['output'], REPORT_NAME)}")
    print(f"{summary['inputs']} inputs: {summary['predictions']} predictions, "
          f"{summary['errors']} errors, {summary['images_per_second']} images/s")
    if summary["error_rate"] > options.max_error_rate:
        _LOG.error("error rate %.3f exceeds --max-error-rate %.3f", summary["error_rate"],
                   options.max_error_rate)
        return EXIT_TOO_MANY_ERRORS
    if options.fail_on_drift and summary["drift"]["alert"]:
        return EXIT_DRIFT
    if summary.get("challenger", {}).get("alert"):
        _LOG.error("%s of the images change decision with the challenger, above "
                   "--fail-on-disagreement %s", summary["challenger"]["disagreement"],
                   options.fail_on_disagreement)
        return EXIT_DISAGREEMENT
    return 0


if __name__ == "__main__":
    sys.exit(main())
