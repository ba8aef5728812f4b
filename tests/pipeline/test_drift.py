"""Drift statistics on constructed nights, checked against hand computations."""

import math

import pytest

from pipeline.drift import compute_drift, psi, two_proportions

EDGES = [i / 10 for i in range(11)]


def night(cats=300, dogs=200, histogram=(0, 10, 40, 80, 120, 120, 80, 40, 10, 0), uncertain=25,
          errors=5, inputs=None, date="2026-11-20"):
    predictions = cats + dogs
    return {"run_date": date, "run_id": date, "output": f"/scores/dt={date}",
            "inputs": inputs if inputs is not None else predictions + errors,
            "predictions": predictions, "errors": errors, "uncertain": uncertain,
            "profile": {"class_counts": {"cat": cats, "dog": dogs}, "histogram_edges": EDGES,
                        "histogram_counts": list(histogram), "score": "P(dog)"}}


def test_identical_nights_raise_no_alert():
    earlier = [night(date=f"2026-11-{day}") for day in (18, 19, 20)]
    drift = compute_drift(night(date="2026-11-21"), earlier)
    assert drift["alert"] is False and drift["alerts"] == []
    assert drift["class_mix"]["value"] == 0.0 and drift["class_mix"]["p_value"] == pytest.approx(1.0)
    assert drift["score_distribution"]["value"] == 0.0
    assert drift["uncertain_rate"]["z"] == 0.0 and drift["uncertain_rate"]["p_value"] == pytest.approx(1.0)
    assert drift["input_count"]["value"] == 0.0
    assert [run["run_date"] for run in drift["compared_to"]] == ["2026-11-18", "2026-11-19", "2026-11-20"]


def test_a_flipped_class_mix_alerts_with_the_hand_computed_psi():
    # before (pooled over two nights): 600 cats, 400 dogs -> shares 0.6 / 0.4; tonight 0.2 / 0.8
    drift = compute_drift(night(cats=100, dogs=400), [night(), night(date="2026-11-19")])
    by_hand = (0.2 - 0.6) * math.log(0.2 / 0.6) + (0.8 - 0.4) * math.log(0.8 / 0.4)
    assert by_hand == pytest.approx(0.7167038, abs=1e-6)
    assert drift["class_mix"]["value"] == pytest.approx(by_hand, abs=1e-6)
    assert drift["class_mix"]["alert"] is True and "class_mix" in drift["alerts"]
    assert drift["class_mix"]["p_value"] < 1e-30
    assert psi([600, 400], [100, 400]) == pytest.approx(by_hand)


def test_a_shifted_score_distribution_alerts_and_a_small_wobble_does_not():
    before = [0, 10, 40, 80, 120, 120, 80, 40, 10, 0]
    darker = [0, 0, 0, 10, 40, 80, 120, 120, 80, 50]  # every score moved up two bins
    drift = compute_drift(night(histogram=darker), [night(histogram=before)])
    shares_before = [max(c / 500, 1e-4) for c in before]
    shares_tonight = [max(c / 500, 1e-4) for c in darker]
    by_hand = sum((t - b) * math.log(t / b) for b, t in zip(shares_before, shares_tonight, strict=True))
    assert drift["score_distribution"]["value"] == pytest.approx(by_hand, abs=1e-6)
    assert drift["score_distribution"]["alert"] is True
    wobble = [0, 12, 38, 82, 118, 121, 79, 41, 9, 0]
    calm = compute_drift(night(histogram=wobble), [night(histogram=before)])
    assert calm["score_distribution"]["value"] < 0.01 and calm["score_distribution"]["alert"] is False


def test_rates_use_the_two_proportion_z_test():
    # uncertain: 50 of 1,000 before, 40 of 400 tonight
    z, p = two_proportions(50, 1000, 40, 400)
    pooled = 90 / 1400
    z_by_hand = (0.1 - 0.05) / math.sqrt(pooled * (1 - pooled) * (1 / 400 + 1 / 1000))
    assert z == pytest.approx(z_by_hand, rel=1e-9) and z == pytest.approx(3.4459, abs=1e-4)
    assert p == pytest.approx(math.erfc(z_by_hand / math.sqrt(2)), rel=1e-9)
    drift = compute_drift(night(cats=240, dogs=160, uncertain=40),
                          [night(cats=600, dogs=400, uncertain=50)])
    assert drift["uncertain_rate"]["tonight"] == 0.1 and drift["uncertain_rate"]["before"] == 0.05
    assert drift["uncertain_rate"]["alert"] is True  # p < 0.001 and +5 points
    # the same 5-point jump on a tiny night is not significant
    small = compute_drift(night(cats=12, dogs=8, uncertain=2, errors=0),
                          [night(cats=12, dogs=8, uncertain=1, errors=0)])
    assert small["uncertain_rate"]["p_value"] > 0.001 and small["uncertain_rate"]["alert"] is False


def test_error_rate_needs_significance_and_a_visible_change():
    earlier = [night(errors=5, inputs=100_005) for _ in range(2)]  # pooled 10 of 200,010
    tiny_change = compute_drift(night(errors=30, inputs=100_030), earlier)
    assert tiny_change["error_rate"]["p_value"] < 0.001  # 0.005% -> 0.03%: significant...
    assert tiny_change["error_rate"]["alert"] is False  # ...but not a 1-point change
    broken = compute_drift(night(errors=5000, inputs=100_000), earlier)
    assert broken["error_rate"]["alert"] is True


def test_the_input_count_is_a_z_score_against_at_least_three_nights():
    earlier = [night(inputs=count, date=f"2026-11-{day}")
               for count, day in ((1000, 17), (1100, 18), (900, 19))]  # mean 1000, sd 100
    assert compute_drift(night(inputs=1400), earlier)["input_count"]["value"] == pytest.approx(4.0)
    assert compute_drift(night(inputs=1400), earlier)["input_count"]["alert"] is True
    assert compute_drift(night(inputs=1200), earlier)["input_count"]["alert"] is False
    two_nights = compute_drift(night(inputs=5000), earlier[:2])["input_count"]
    assert two_nights["value"] is None and two_nights["alert"] is False


def test_no_earlier_night_means_nothing_to_compare():
    drift = compute_drift(night(), [])
    assert drift == {"compared_to": [], "alert": False, "thresholds": drift["thresholds"],
                     "note": "no earlier committed run of this model version to compare with"}


def test_nights_scored_another_way_are_left_out_and_named_never_pooled_silently():
    plain = [night(date="2026-11-18"), night(date="2026-11-19", cats=100, dogs=400)]
    flipped = {**night(date="2026-11-20"), "tta": "flip"}
    tonight = {**night(date="2026-11-21"), "tta": "flip"}
    drift = compute_drift(tonight, [*plain, flipped])
    assert [run["run_date"] for run in drift["compared_to"]] == ["2026-11-20"]
    assert drift["class_mix"]["value"] == 0.0  # the flipped night alone: the shifted plain one left out
    assert [(run["run_date"], run["tta"], run["faces"]) for run in drift["not_comparable"]] == [
        ("2026-11-18", "none", "off"), ("2026-11-19", "none", "off")]
    assert drift["note"] == ("not comparable: 2 earlier night(s) of this model version were scored "
                             "otherwise than tonight (--tta flip, --faces off) and are left out: "
                             "2026-11-18 (--tta none, --faces off), 2026-11-19 (--tta none, --faces off)")
    alone = compute_drift(tonight, plain)  # none scored the same way: nothing compared, and why
    assert alone["compared_to"] == [] and alone["alert"] is False and "class_mix" not in alone
    assert alone["note"].startswith("not comparable: 2 earlier night(s)")
    faces = compute_drift({**night(date="2026-11-21"), "faces": "detect"}, plain)
    assert faces["compared_to"] == [] and faces["note"].startswith("not comparable")
    # records written before the fields scored with neither: still compared with a plain night
    assert [run["run_date"] for run in compute_drift(night(date="2026-11-21"), plain)["compared_to"]] == [
        "2026-11-18", "2026-11-19"]
