"""The run summary, ``summary.json``: the run's completion record, written last, with the
night's profile (class mix, score histogram, example errors) and its drift against earlier
nights; the review queue and ``report.html`` are written just before it.

Counts come from the data (combines over the PCollections), not from metrics, so they are exact
on every runner; ``accounted`` proves that every input became exactly one prediction or error
row, or was skipped.

The record's main input is the list of files the sinks finalised (the Parquet sinks' written
file names and the CSV's path), gathered by one global combine: on any runner it cannot be
written before every other output is final, and a run killed at any point has none. It lists
those files (path relative to the output prefix, and size), so a reader trusts a run only once
``summary.json`` exists, and only the files it lists.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import time
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.io.filesystems import FileSystems

from pipeline.drift import compute_drift
from pipeline.report import review_rows, write_review_queue, write_run_report
from pipeline.rows import ALREADY_SCORED, HUMAN, OUT_OF_SCOPE, SKIP_REASONS, UNCERTAIN, probability_column
from pipeline.write import write_file_atomically

_LOG = logging.getLogger("petscore")


def listed_files(paths: list[str], output: str) -> list[dict[str, Any]]:
    """``[{'path': relative to output, 'bytes': size}]``, sorted: the files a reader may trust."""
    prefix = output.rstrip("/") + "/"
    sizes = {metadata.path: metadata.size_in_bytes
             for result in FileSystems.match(paths) for metadata in result.metadata_list}
    return [{"path": path.removeprefix(prefix), "bytes": sizes[path]} for path in sorted(paths)]


HISTOGRAM_BINS = 10
HISTOGRAM_EDGES = [i / HISTOGRAM_BINS for i in range(HISTOGRAM_BINS + 1)]  # 0.3 is exactly 3 / 10
ERROR_EXAMPLES = 3


TOP_PARTS_BEFORE_MERGE = 16


def add_to_top(parts: list[pa.Table], table: pa.Table, first) -> list[pa.Table]:
    """A combiner's top rows (the review queue, the largest flips) in bounded memory with few
    merges: ``parts`` with ``first([table])`` added, merged into ``[first(parts)]`` once they are
    more than ``TOP_PARTS_BEFORE_MERGE``. ``first``: tables -> the top rows of them, one table."""
    parts.append(first([table]))
    return [first(parts)] if len(parts) > TOP_PARTS_BEFORE_MERGE else parts


class PredictionProfileFn(beam.CombineFn):
    """Prediction tables -> ``{'count', 'uncertain', 'out_of_scope', 'human', 'with_human_faces',
    'class_counts', 'histogram', 'review'}`` in one pass and bounded memory, a whole table at a
    time: counts of decisions and of images with at least one human face, counts per class, a
    ``HISTOGRAM_BINS``-bin histogram of ``score_column`` (bins [a, b) at the edges i / 10, as
    ``bisect.bisect_right`` on those edges; 1.0 falls in the last) and the ``review_size`` rows a
    person should look at first (``review_columns``): the images flagged ``out_of_scope``,
    furthest out first, then the least confident, least confident first (ties by path)."""

    def __init__(self, score_column: str, review_columns: list[str], review_size: int):
        self._score_column = score_column
        self._review_columns = review_columns
        self._review_size = review_size

    def create_accumulator(self):
        return {"count": 0, "uncertain": 0, "out_of_scope": 0, "human": 0, "with_human_faces": 0,
                "class_counts": collections.Counter(),
                "histogram": np.zeros(HISTOGRAM_BINS, np.int64), "review": []}

    def add_input(self, profile, table):
        profile["count"] += table.num_rows
        profile["uncertain"] += pc.sum(pc.equal(table["decision"], UNCERTAIN)).as_py() or 0
        profile["out_of_scope"] += pc.sum(pc.equal(table["decision"], OUT_OF_SCOPE)).as_py() or 0
        profile["human"] += pc.sum(pc.equal(table["decision"], HUMAN)).as_py() or 0
        profile["with_human_faces"] += pc.sum(pc.greater(table["human_faces"], 0)).as_py() or 0
        counts = pc.value_counts(table["predicted_class"])
        profile["class_counts"].update(dict(zip(counts.field("values").to_pylist(),
                                                counts.field("counts").to_pylist(), strict=True)))
        bins = np.searchsorted(HISTOGRAM_EDGES, table[self._score_column].to_numpy(), side="right") - 1
        profile["histogram"] += np.bincount(np.clip(bins, 0, HISTOGRAM_BINS - 1), minlength=HISTOGRAM_BINS)
        if self._review_size:
            profile["review"] = add_to_top(profile["review"], table.select(self._review_columns),
                                           self._first_to_review)
        return profile

    def merge_accumulators(self, profiles):
        merged = self.create_accumulator()
        for profile in profiles:
            merged["count"] += profile["count"]
            merged["uncertain"] += profile["uncertain"]
            for key in ("out_of_scope", "human", "with_human_faces"):
                merged[key] += profile[key]
            merged["class_counts"].update(profile["class_counts"])
            merged["histogram"] += profile["histogram"]
            merged["review"] += profile["review"]
        if merged["review"]:
            merged["review"] = [self._first_to_review(merged["review"])]
        return merged

    def extract_output(self, profile):
        review = self._first_to_review(profile["review"]).to_pylist() if profile["review"] else []
        return {**profile, "class_counts": dict(profile["class_counts"]),
                "histogram": profile["histogram"].tolist(), "review": review}

    def _first_to_review(self, tables: list[pa.Table]) -> pa.Table:
        table = pa.concat_tables(tables)
        keys = {"confidence": table["confidence"], "path": table["path"]}
        if "scope_score" in table.column_names:  # out of scope first, the highest score first
            flagged = pc.equal(table["decision"], OUT_OF_SCOPE)
            keys = {"rank": pc.if_else(flagged, 0, 1),
                    "confidence": pc.if_else(flagged, pc.negate(table["scope_score"]), table["confidence"]),
                    "path": table["path"]}
        order = pc.sort_indices(pa.table(keys), sort_keys=[(name, "ascending") for name in keys])
        return table.take(order[:self._review_size])


class ChallengerComparisonFn(beam.CombineFn):
    """Tables of paired rows (``inference.paired_rows``: each image the model scored, with the
    challenger's decision and probabilities, null where its decoding refused the image) -> how the
    two models differ, in one pass and bounded memory: ``rows``, ``compared`` (scored by both),
    ``agreeing`` (same decision), ``flips`` ({(model's decision, challenger's): images}), per class
    the sum and largest |difference| of the probabilities, the out-of-scope cross-count where both
    models flag (``scope``) and the ``review_size`` flips with the largest difference of any
    class's probability (ties by path), for the review queue and the report."""

    def __init__(self, class_names: list[str], review_size: int, scope: bool):
        self._columns = [probability_column(name) for name in class_names]
        self._review_size = review_size
        self._scope = scope

    def create_accumulator(self):
        return {"rows": 0, "compared": 0, "agreeing": 0, "flips": collections.Counter(),
                "difference_sum": np.zeros(len(self._columns)),
                "difference_max": np.zeros(len(self._columns)),
                "scope": collections.Counter(), "flipped": []}

    def add_input(self, comparison, table):
        comparison["rows"] += table.num_rows
        table = table.filter(pc.is_valid(table["challenger_decision"]))
        comparison["compared"] += table.num_rows
        difference = np.abs(np.column_stack(
            [table[name].to_numpy() - table[f"challenger_{name}"].to_numpy() for name in self._columns]))
        if table.num_rows:
            comparison["difference_sum"] += difference.sum(axis=0)
            comparison["difference_max"] = np.maximum(comparison["difference_max"], difference.max(axis=0))
        agree = pc.equal(table["decision"], table["challenger_decision"])
        comparison["agreeing"] += pc.sum(agree).as_py() or 0
        if self._scope:
            ours = pc.equal(table["decision"], OUT_OF_SCOPE).to_numpy(zero_copy_only=False)
            theirs = pc.equal(table["challenger_decision"], OUT_OF_SCOPE).to_numpy(zero_copy_only=False)
            comparison["scope"].update({"both": int((ours & theirs).sum()),
                                        "model_only": int((ours & ~theirs).sum()),
                                        "challenger_only": int((~ours & theirs).sum())})
        flipped = table.append_column("difference", pa.array(difference.max(axis=1, initial=0.0)))
        flipped = flipped.filter(pc.invert(agree))
        for row in flipped.group_by(["decision", "challenger_decision"]).aggregate(
                [("path", "count")]).to_pylist():
            comparison["flips"][(row["decision"], row["challenger_decision"])] += row["path_count"]
        if self._review_size and flipped.num_rows:
            comparison["flipped"] = add_to_top(comparison["flipped"], flipped, self._first_flips)
        return comparison

    def merge_accumulators(self, comparisons):
        merged = self.create_accumulator()
        for comparison in comparisons:
            for key in ("rows", "compared", "agreeing", "difference_sum"):
                merged[key] += comparison[key]
            merged["difference_max"] = np.maximum(merged["difference_max"], comparison["difference_max"])
            merged["flips"].update(comparison["flips"])
            merged["scope"].update(comparison["scope"])
            merged["flipped"] += comparison["flipped"]
        if merged["flipped"]:
            merged["flipped"] = [self._first_flips(merged["flipped"])]
        return merged

    def extract_output(self, comparison):
        flipped = self._first_flips(comparison["flipped"]).to_pylist() if comparison["flipped"] else []
        return {**comparison, "flips": [[*pair, count] for pair, count in comparison["flips"].items()],
                "scope": dict(comparison["scope"]) if self._scope else None, "flipped": flipped,
                "difference_sum": comparison["difference_sum"].tolist(),
                "difference_max": comparison["difference_max"].tolist()}

    def _first_flips(self, tables: list[pa.Table]) -> pa.Table:
        table = pa.concat_tables(tables)
        order = pc.sort_indices(table, sort_keys=[("difference", "descending"), ("path", "ascending")])
        return table.take(order[:self._review_size])


def challenger_block(comparison: dict, challenger: dict, class_names: list[str],
                     predictions: int) -> dict[str, Any]:
    """The summary's ``challenger`` block: the challenger's model (``challenger``, from the run's
    context), its counts (``predictions`` + ``errors`` = the model's ``predictions``), the share of
    images whose decision agrees, the flips by (model's decision, challenger's decision), the mean
    and largest |difference| of each class's probability, and out-of-scope agreement where both
    models had a detector in use; ``alert`` when the disagreement is above its limit."""
    compared = comparison["compared"]
    agreement = comparison["agreeing"] / compared if compared else None
    limit = challenger.get("disagreement_limit")
    scope = None
    if comparison["scope"] is not None:
        counts = {key: comparison["scope"].get(key, 0) for key in ("both", "model_only", "challenger_only")}
        differ = counts["model_only"] + counts["challenger_only"]
        scope = {**counts, "agreement": round(1 - differ / compared, 6) if compared else None}
    flips = sorted(comparison["flips"], key=lambda flip: (-flip[2], flip[0], flip[1]))
    return {
        **challenger,
        "predictions": compared,
        "errors": comparison["rows"] - compared,
        "accounted": comparison["rows"] == predictions,
        "agreement": None if agreement is None else round(agreement, 6),
        "disagreement": None if agreement is None else round(1 - agreement, 6),
        "flipped": compared - comparison["agreeing"],
        "flips": [{"model": ours, "challenger": theirs, "images": count} for ours, theirs, count in flips],
        "probability_difference": {
            name: {"mean": round(total / compared, 6) if compared else None, "max": round(largest, 6)}
            for name, total, largest in zip(class_names, comparison["difference_sum"],
                                            comparison["difference_max"], strict=True)},
        "out_of_scope": scope,
        "alert": bool(limit is not None and agreement is not None and 1 - agreement > limit),
    }


class ErrorProfileFn(beam.CombineFn):
    """Error tables -> ``{error_type: [count, first ERROR_EXAMPLES (path, message)]}``."""

    def create_accumulator(self):
        return {}

    def add_input(self, profile, table):
        for row in table.select(["error_type", "path", "message"]).to_pylist():
            count, examples = profile.setdefault(row["error_type"], [0, []])
            profile[row["error_type"]][0] = count + 1
            if len(examples) < ERROR_EXAMPLES:
                examples.append((row["path"], row["message"]))
        return profile

    def merge_accumulators(self, profiles):
        merged = {}
        for profile in profiles:
            for kind, (count, examples) in profile.items():
                total, kept = merged.setdefault(kind, [0, []])
                merged[kind] = [total + count, (kept + examples)[:ERROR_EXAMPLES]]
        return merged

    def extract_output(self, profile):
        return profile


class SkippedCounts(beam.CombineFn):
    """``SkippedInputs`` in; ``{reason: count}`` out, every one of ``SKIP_REASONS`` present."""

    def create_accumulator(self):
        return dict.fromkeys(SKIP_REASONS, 0)

    def add_input(self, counts, skipped):
        counts[skipped.reason] += skipped.count
        return counts

    def merge_accumulators(self, accumulators):
        merged = self.create_accumulator()
        for counts in accumulators:
            for reason, count in counts.items():
                merged[reason] += count
        return merged

    def extract_output(self, counts):
        return counts


@dataclasses.dataclass(frozen=True)
class ReportSettings:
    """What the run's profile and report need beyond the counts.

    ``score_column``: the value whose histogram profiles the night (P(positive class) for two
    classes, the top probability otherwise); ``earlier``: records of earlier committed runs of
    this model version to compare with (``--compare-to``), oldest first.
    """

    class_names: list[str]
    score_column: str
    score_label: str
    review_size: int
    earlier: list[dict]
    thresholds: dict | None = None
    scope: bool = False  # rows carry the out-of-scope detector's score and decision
    challenger_scope: bool = False  # the challenger's rows carry its detector's decisions too


def build_summary(written: list[str], *, inputs: int, predictions: dict, errors: dict,
                  csv_rows: int, skipped: dict[str, int], score_label: str, started: float,
                  context: dict[str, Any], challenger: dict | None = None) -> dict[str, Any]:
    """The record's fields; ``predictions`` and ``errors`` are the two profiles above,
    ``skipped`` the ``SkippedCounts``, ``challenger`` the comparison
    (``ChallengerComparisonFn``) of a run with one."""
    error_count = sum(count for count, _ in errors.values())
    elapsed = time.time() - started
    if challenger is not None:
        context = {**context, "challenger": challenger_block(
            challenger, context["challenger"], context["class_names"], predictions["count"])}
    return {
        **context,
        "inputs": inputs,
        "predictions": predictions["count"],
        "errors": error_count,
        "errors_by_type": {kind: errors[kind][0] for kind in sorted(errors)},
        "skipped_already_scored": skipped[ALREADY_SCORED],  # the field before skipped_by_reason
        "skipped_by_reason": dict(sorted(skipped.items())),
        "uncertain": predictions["uncertain"],
        # images the model's out-of-scope detector flagged; None where none was in use
        "out_of_scope": (predictions["out_of_scope"] if context.get("out_of_scope_threshold") is not None
                         else None),
        # --faces: images decided 'human', and images with at least one human face (of those
        # checked: every image with detect, only the ones the model was unsure of with unsure)
        **{key: predictions[key] if context.get("faces", "off") != "off" else None
           for key in ("human", "with_human_faces")},
        "csv_rows": csv_rows,
        "accounted": inputs == predictions["count"] + error_count + sum(skipped.values()),
        "error_rate": error_count / inputs if inputs else 0.0,
        "elapsed_seconds": round(elapsed, 3),
        "images_per_second": round(inputs / elapsed, 2) if elapsed > 0 else None,
        "profile": {
            "class_counts": dict(sorted(predictions["class_counts"].items())),
            "score": score_label,
            "histogram_edges": HISTOGRAM_EDGES,
            "histogram_counts": predictions["histogram"],
            "error_examples": {kind: [list(example) for example in errors[kind][1]]
                               for kind in sorted(errors)},
        },
        "files": written,
    }


def commit_run(written: list[str], *, inputs: int, predictions: dict, errors: dict,
               csv_rows: int, skipped: dict[str, int], settings: ReportSettings, started: float,
               context: dict[str, Any], path: str, challenger: dict | None = None) -> dict[str, Any]:
    """The summary, its drift, the review queue and the report, then the record listing every
    file, last. ``predictions`` and ``errors`` are the two profiles above, ``challenger`` the
    comparison of a run with one (its flips lead the review queue)."""
    summary = build_summary(written, inputs=inputs, predictions=predictions, errors=errors,
                            csv_rows=csv_rows, skipped=skipped, score_label=settings.score_label,
                            started=started, context=context, challenger=challenger)
    review = review_rows(predictions["review"], challenger["flipped"] if challenger else [],
                         settings.review_size)
    output = summary["output"]
    summary["drift"] = compute_drift(summary, settings.earlier, settings.thresholds)
    if summary["drift"]["alert"]:  # on Dataflow this runs on a worker: Cloud Logging has it
        _LOG.warning("petscore drift alert for %s against %d earlier nights: %s", output,
                     len(summary["drift"]["compared_to"]), ", ".join(summary["drift"]["alerts"]))
    if summary.get("challenger", {}).get("alert"):
        _LOG.warning("petscore challenger alert for %s: %s of the images change decision with %s "
                     "(limit %s)", output, summary["challenger"]["disagreement"],
                     summary["challenger"]["model_version"], summary["challenger"]["disagreement_limit"])
    written = summary["files"] + write_review_queue(output, review, settings.class_names, settings.scope,
                                                    challenger=challenger is not None)
    write_run_report(output, summary, review, settings.earlier)  # a view: not in the record
    summary["files"] = listed_files(written, output)
    write_file_atomically(path, json.dumps(summary, indent=2, sort_keys=True).encode())
    return summary


def combined_globally(pcoll, label: str, combine_fn: beam.CombineFn):
    """``combine_fn`` over the whole of ``pcoll``, as a singleton side input; an empty ``pcoll``
    gives ``combine_fn``'s result for no input. Beam's own default for an empty input would add
    two more steps to the graph (an Impulse and a side input) for every combine."""
    combined = pcoll | label >> beam.CombineGlobally(combine_fn).without_defaults()
    empty = combine_fn.extract_output(combine_fn.create_accumulator())
    return beam.pvalue.AsSingleton(combined, default_value=empty)


class WriteRunSummary(beam.PTransform):
    """``{'written': final paths of every other output, 'inputs': input counts, 'predictions':
    prediction tables, 'errors': error tables, 'skipped': SkippedInputs, 'csv_rows'}`` in; the
    review queue, ``report.html`` and, last, ``summary.json`` out; with a challenger, ``'pairs'``
    (``inference.paired_rows`` tables) in too, and its comparison in the record. ``context`` goes
    in as it is;
    its ``paths_prefix`` (what every input path starts with) tells later --skip-scored runs
    whether this run can hold their paths at all.

    ``elapsed_seconds`` runs from the launch (``started``, a wall-clock timestamp) to the moment
    every other output is final. Inputs = predictions + errors + skipped (``skipped_by_reason``:
    already scored by this model version, with ``--skip-scored``; object-store folder
    placeholders). The night's profile is two bounded combines, one over
    the predictions and one over the errors, so the profile adds two steps to the graph.
    """

    def __init__(self, path: str, started: float, context: dict[str, Any], settings: ReportSettings):
        super().__init__()
        self._path = path
        self._started = started
        self._context = context
        self._settings = settings

    def expand(self, outputs):
        settings = self._settings
        challenger = {}
        if "pairs" in outputs:  # a run with a challenger: both models' rows, joined in each batch
            challenger["challenger"] = combined_globally(
                outputs["pairs"], "CompareChallenger", ChallengerComparisonFn(
                    settings.class_names, settings.review_size, settings.scope and settings.challenger_scope))
        review_columns = ["path", "predicted_class", "decision", "confidence",
                          *[probability_column(name) for name in settings.class_names],
                          *(["scope_score"] if settings.scope else [])]
        predictions = combined_globally(outputs["predictions"], "ProfilePredictions", PredictionProfileFn(
            settings.score_column, review_columns, settings.review_size))
        errors = combined_globally(outputs["errors"], "ProfileErrors", ErrorProfileFn())
        # Without defaults, the list travels as WriteSummary's main input, through a
        # GroupByKey (a default would arrive beside it, as the side input of an injected
        # element). There is always a written file: the CSV, even for an empty run.
        return (outputs["written"]
                | "AllWrittenFiles" >> beam.CombineGlobally(
                    beam.combiners.ToListCombineFn()).without_defaults()
                | "WriteSummary" >> beam.Map(
                    commit_run,
                    inputs=combined_globally(outputs["inputs"], "CountInputs",
                                             beam.CombineFn.from_callable(sum)),
                    predictions=predictions,
                    errors=errors,
                    csv_rows=beam.pvalue.AsSingleton(outputs["csv_rows"]),
                    skipped=combined_globally(outputs["skipped"], "CountSkipped", SkippedCounts()),
                    settings=settings,
                    started=self._started,
                    context=self._context,
                    path=self._path,
                    **challenger))
