"""May a challenger replace the model? The rule ``deploy/nightly.sh promote`` applies.

    python -m pipeline.promotion --nights 'gs://bkt/scores/dt=*' --candidate gs://bkt/models/candidate \\
        [--after 7] [--max-disagreement 0.02] [--compare compare.json]

Yes when the last ``--after`` committed nights under ``--nights`` all scored this very candidate
as their challenger (``summary.json``'s ``challenger`` block, matched by the SHA-256 of its
SavedModel, so a re-uploaded candidate starts counting again) and each changed the decision of
at most ``--max-disagreement`` of its images; or when ``model.compare``'s JSON (``--compare``,
model B being the candidate) says ``B better``. A ``B worse`` verdict refuses whatever the nights
say. Prints one line; exits 0 to promote, 1 not (yet).
"""

from __future__ import annotations

import argparse
import json
import sys

from apache_beam.io.filesystems import FileSystems

from pipeline.records import committed_runs
from serving.metadata import read_metadata

BETTER, WORSE = "B better", "B worse"  # model.compare's verdicts (its JSON's "verdict")


def nights_verdict(records: list[dict], candidate_sha256: str, after: int,
                   max_disagreement: float) -> tuple[bool, str]:
    """``(promote, why)`` from committed nights' records, oldest first: the last ``after`` must
    each carry a challenger block of the candidate at most ``max_disagreement`` apart."""
    recent = records[-after:] if after else []
    good = 0
    for record in reversed(recent):  # the most recent nights in a row
        block = record.get("challenger") or {}
        if (block.get("model_sha256") != candidate_sha256 or block.get("disagreement") is None
                or block["disagreement"] > max_disagreement or not block.get("accounted")):
            break
        good += 1
    worst = max((record["challenger"]["disagreement"] for record in recent[len(recent) - good:]),
                default=None)
    summary = (f"{good} of the last {after} committed nights scored the candidate as challenger "
               f"with at most {max_disagreement:.2%} of their images changing decision"
               + (f" (the most: {worst:.2%})" if worst is not None else ""))
    return good >= after, summary


def compare_verdict(path: str, candidate_sha256: str) -> str:
    """``model.compare``'s verdict ("B better", "no evidence" or "B worse") from the
    ``compare.json`` it wrote, which must have compared the candidate as model B (its SavedModel
    hash): a verdict on another model says nothing of this one. Raises ``ValueError``."""
    with FileSystems.open(path) as handle:
        result = json.loads(handle.read())
    verdict = (result.get("verdict") or {}).get("verdict") if isinstance(result, dict) else None
    if not isinstance(verdict, str):
        raise ValueError(f"{path} has no verdict: give the compare.json that python -m model.compare "
                         "writes")
    compared = result.get("models", {}).get("B", {}).get("model_sha256")
    if compared != candidate_sha256:
        raise ValueError(f"{path} compared model B {compared}, not the candidate ({candidate_sha256}): "
                         "run python -m model.compare --model <current> --model <candidate> again")
    return verdict


def decide(nights: str, candidate: str, after: int, max_disagreement: float,
           compare: str | None = None) -> tuple[bool, str]:
    """``(promote, one line saying why)``; see the module's docstring."""
    sha256 = read_metadata(candidate).sha256
    if compare:
        verdict = compare_verdict(compare, sha256)
        if verdict.startswith(WORSE):
            return False, f"model.compare says {verdict!r} ({compare}): keep the model"
        if verdict.startswith(BETTER):
            return True, f"model.compare says {verdict!r} ({compare})"
    records = [record for _, record in committed_runs(nights)]
    promote, why = nights_verdict(records, sha256, after, max_disagreement)
    return promote, why + ("" if promote or not compare else f"; model.compare says {verdict!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.promotion", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nights", required=True, help="Glob of the nights' output prefixes.")
    parser.add_argument("--candidate", required=True, help="The challenger's model directory.")
    parser.add_argument("--after", type=int, default=7, help="Nights in a row it must pass (default 7).")
    parser.add_argument("--max-disagreement", type=float, default=0.02,
                        help="Largest share of a night's images whose decision may change (default 0.02).")
    parser.add_argument("--compare", help="model.compare's JSON on labelled data, the candidate as B.")
    args = parser.parse_args(argv)
    if args.after < 1:
        parser.error("--after must be 1 or more")
    try:
        promote, why = decide(args.nights, args.candidate, args.after, args.max_disagreement, args.compare)
    except (ValueError, OSError) as refusal:
        print(f"petscore promotion: {refusal}", file=sys.stderr)
        return 1
    print(f"{'promote' if promote else 'not yet'}: {why}")
    return 0 if promote else 1


if __name__ == "__main__":
    sys.exit(main())
