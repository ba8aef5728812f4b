"""Is tonight different from the nights before? One standard statistic per question, each with a
documented default threshold.

Tonight's run profile (class mix, histogram of the score, rates, input count: all in its
``summary.json``) is compared with the pooled profiles of earlier committed runs of the same
model version (``--compare-to``), so no earlier prediction is read again:

- class mix and score distribution: population stability index (PSI) of the shares,
  sum((tonight - before) * ln(tonight / before)), shares floored at 1e-4; alert at >= 0.2 (the
  usual reading: < 0.1 stable, 0.1-0.2 moderate, >= 0.2 a shift). A chi-square test of
  homogeneity on the same counts gives the p-value beside it.
- uncertain rate, error rate and out-of-scope rate: two-proportion z-test (tonight against the
  pooled nights; the chi-square test of the 2x2 table without continuity correction, z = sign *
  sqrt(chi2)); alert when p < 0.001 *and* the rate moved by at least 2 points (uncertain, out of
  scope) or 1 point (errors), so a huge night does not alert on a trivial difference. The
  out-of-scope rate (a camera that starts filming a wall) is checked where tonight's model had a
  detector in use, against the earlier nights that had one.
- input count: z-score of tonight's count against the earlier nights' (mean, sample standard
  deviation, at least one image; at least 3 nights); alert at |z| >= 3.

Only nights scored the same way are compared (``SCORING``: ``--tta`` and ``--faces``, recorded in
each summary; records written before them scored with neither): mirrored scoring moves the
probabilities and the uncertain rate, and ``human`` decisions take images from the uncertain and
out-of-scope rates, so a change of settings would read as drift. Earlier nights scored otherwise
are named in ``not_comparable``, with a note, never pooled silently.
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_THRESHOLDS = {
    "psi": 0.2,
    "p_value": 0.001,
    "uncertain_rate_change": 0.02,
    "error_rate_change": 0.01,
    "out_of_scope_rate_change": 0.02,
    "input_count_z": 3.0,
    "min_nights_for_count": 3,
}
SHARE_FLOOR = 1e-4
# How a night was scored, as its record says, with the value records from before the field meant.
SCORING = {"tta": "none", "faces": "off"}


def shares(counts) -> np.ndarray:
    counts = np.asarray(counts, dtype=float)
    return counts / counts.sum() if counts.sum() else counts


def psi(before_counts, tonight_counts) -> float:
    """Population stability index of two count vectors over the same bins."""
    before = np.maximum(shares(before_counts), SHARE_FLOOR)
    tonight = np.maximum(shares(tonight_counts), SHARE_FLOOR)
    return float(np.sum((tonight - before) * np.log(tonight / before)))


def homogeneity_p_value(before_counts, tonight_counts) -> float | None:
    """Chi-square test that both count vectors come from one distribution (empty bins dropped)."""
    table = np.array([before_counts, tonight_counts], dtype=float)
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2 or (table.sum(axis=1) == 0).any():
        return None
    from scipy import stats  # 0.8 s and 75 MB: only runs that compare with earlier nights pay

    return float(stats.chi2_contingency(table, correction=False).pvalue)


def two_proportions(before_hits: int, before_total: int, hits: int, total: int) -> tuple[float, float]:
    """``(z, p)`` of the two-proportion z-test, tonight's rate against the earlier one."""
    table = np.array([[hits, total - hits], [before_hits, before_total - before_hits]], dtype=float)
    if (table.sum(axis=0) == 0).any() or (table.sum(axis=1) == 0).any():
        return 0.0, 1.0
    from scipy import stats

    result = stats.chi2_contingency(table, correction=False)
    sign = 1.0 if hits / total >= before_hits / before_total else -1.0
    return sign * math.sqrt(result.statistic), float(result.pvalue)


def _distribution(before: dict, tonight: dict, threshold: float) -> dict:
    keys = sorted(set(before) | set(tonight))
    before_counts = [before.get(key, 0) for key in keys]
    tonight_counts = [tonight.get(key, 0) for key in keys]
    value = psi(before_counts, tonight_counts)
    return {"statistic": "psi", "value": round(value, 6), "threshold": threshold,
            "p_value": homogeneity_p_value(before_counts, tonight_counts),
            "tonight": dict(zip(keys, [round(s, 6) for s in shares(tonight_counts)], strict=True)),
            "before": dict(zip(keys, [round(s, 6) for s in shares(before_counts)], strict=True)),
            "alert": bool(value >= threshold)}


def _rate(before_hits, before_total, hits, total, min_change, p_threshold) -> dict:
    z, p = two_proportions(before_hits, before_total, hits, total)
    tonight = hits / total if total else 0.0
    before = before_hits / before_total if before_total else 0.0
    return {"statistic": "two-proportion z", "tonight": round(tonight, 6),
            "before": round(before, 6), "z": round(z, 4), "p_value": p,
            "threshold": {"p_value": p_threshold, "min_change": min_change},
            "alert": bool(p < p_threshold and abs(tonight - before) >= min_change)}


def _count(earlier_counts: list[int], tonight: int, threshold: float, min_nights: int) -> dict:
    result = {"statistic": "z-score", "tonight": tonight, "threshold": threshold, "alert": False}
    if len(earlier_counts) < min_nights:
        return {**result, "value": None, "note": f"needs {min_nights} earlier nights"}
    mean, sd = float(np.mean(earlier_counts)), float(np.std(earlier_counts, ddof=1))
    z = (tonight - mean) / max(sd, 1.0)  # counts are whole images: a spread under one counts as one
    return {**result, "mean": round(mean, 3), "sd": round(sd, 3), "value": round(z, 4),
            "alert": bool(abs(z) >= threshold)}


def histogram_counts(profile: dict) -> dict[str, int]:
    edges = profile["histogram_edges"]
    return {f"{edges[i]:.2f}-{edges[i + 1]:.2f}": count
            for i, count in enumerate(profile["histogram_counts"])}


def scoring(record: dict) -> dict[str, str]:
    """How the run of a summary scored its images: ``{'tta': ..., 'faces': ...}`` (``SCORING``)."""
    return {key: record.get(key) or default for key, default in SCORING.items()}


def comparable_runs(tonight: dict, earlier: list[dict]) -> tuple[list[dict], list[dict]]:
    """``(the earlier records scored as tonight was, the others)``, each in the given order."""
    same = [run for run in earlier if scoring(run) == scoring(tonight)]
    return same, [run for run in earlier if scoring(run) != scoring(tonight)]


def _run_names(runs: list[dict], *extra: str) -> list[dict]:
    return [{key: run.get(key) for key in ("run_date", "run_id", "output")}
            | {key: scoring(run)[key] for key in extra} for run in runs]


def compute_drift(tonight: dict, earlier: list[dict], thresholds: dict | None = None) -> dict:
    """``drift`` block of tonight's summary against earlier run summaries (oldest first): those
    scored as tonight was (``comparable_runs``); the others are listed in ``not_comparable``
    (with how they were scored) and a ``note``, or make the whole note when none is left."""
    limits = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    if not earlier:
        return {"compared_to": [], "alert": False, "thresholds": limits,
                "note": "no earlier committed run of this model version to compare with"}
    earlier, others = comparable_runs(tonight, earlier)
    excluded = {}
    if others:
        def flags(run: dict) -> str:
            return ", ".join(f"--{key} {value}" for key, value in scoring(run).items())

        excluded = {"not_comparable": _run_names(others, *SCORING),
                    "note": f"not comparable: {len(others)} earlier night(s) of this model version "
                            f"were scored otherwise than tonight ({flags(tonight)}) and are left out: "
                            + ", ".join(f"{run.get('run_date')} ({flags(run)})" for run in others)}
    if not earlier:
        return {"compared_to": [], "alert": False, "thresholds": limits, **excluded}
    compared = _run_names(earlier)
    pooled_classes: dict[str, int] = {}
    pooled_histogram: dict[str, int] = {}
    for run in earlier:
        for name, count in run["profile"]["class_counts"].items():
            pooled_classes[name] = pooled_classes.get(name, 0) + count
        for name, count in histogram_counts(run["profile"]).items():
            pooled_histogram[name] = pooled_histogram.get(name, 0) + count
    total = {key: sum(run[key] for run in earlier)
             for key in ("inputs", "predictions", "errors", "uncertain")}
    checks = {
        "class_mix": _distribution(pooled_classes, tonight["profile"]["class_counts"], limits["psi"]),
        "score_distribution": _distribution(pooled_histogram, histogram_counts(tonight["profile"]),
                                            limits["psi"]),
        "uncertain_rate": _rate(total["uncertain"], total["predictions"], tonight["uncertain"],
                                tonight["predictions"], limits["uncertain_rate_change"],
                                limits["p_value"]),
        "error_rate": _rate(total["errors"], total["inputs"], tonight["errors"], tonight["inputs"],
                            limits["error_rate_change"], limits["p_value"]),
        "input_count": _count([run["inputs"] for run in earlier], tonight["inputs"],
                              limits["input_count_z"], limits["min_nights_for_count"]),
    }
    scoped = [run for run in earlier if run.get("out_of_scope") is not None]
    if tonight.get("out_of_scope") is not None and scoped:
        checks["out_of_scope_rate"] = _rate(
            sum(run["out_of_scope"] for run in scoped), sum(run["predictions"] for run in scoped),
            tonight["out_of_scope"], tonight["predictions"], limits["out_of_scope_rate_change"],
            limits["p_value"])
    return {"compared_to": compared, "thresholds": limits, **checks, **excluded,
            "alerts": [name for name, check in checks.items() if check["alert"]],
            "alert": any(check["alert"] for check in checks.values())}
