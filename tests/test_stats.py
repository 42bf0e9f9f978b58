"""Summary statistics: bootstrap intervals that cover what they should, paired differences that cancel what two
rows share."""

import math
import random

import pytest

from soda_distill.stats import T975, bootstrap_ci, length_summary, paired_difference, seed_interval, seeded_paired_difference


def test_paired_difference_of_a_constant_shift_is_exact():
    rng = random.Random(0)
    base = [rng.uniform(0, 100) for _ in range(200)]  # prompts of very different difficulty
    result = paired_difference([b + 1.5 for b in base], base)
    assert result["difference"] == pytest.approx(1.5) and result["ci95"] == pytest.approx([1.5, 1.5])
    assert result["prompts"] == 200


def test_pairing_cancels_prompt_difficulty_that_unpaired_intervals_keep():
    rng = random.Random(1)
    base = [rng.uniform(0, 100) for _ in range(300)]
    better = [b + 1.0 + rng.gauss(0, 1) for b in base]
    paired = paired_difference(better, base)
    assert paired["ci95"][0] > 0  # the paired interval sees the improvement
    a, b = bootstrap_ci(better), bootstrap_ci(base)
    assert a[0] < b[1]  # the two rows' own intervals overlap: unpaired, it would not show


def test_intervals_cover_the_true_mean_about_95_percent_of_the_time():
    rng = random.Random(2)
    covered = 0
    for trial in range(200):
        sample = [rng.gauss(10, 3) for _ in range(60)]
        lo, hi = bootstrap_ci(sample, resamples=500, seed=trial)
        covered += lo <= 10 <= hi
    assert 0.88 <= covered / 200 <= 0.99


def test_missing_values_are_left_out_pairwise():
    result = paired_difference([1.0, None, 3.0, 5.0], [0.0, 2.0, None, 4.0])
    assert result["prompts"] == 2 and result["difference"] == pytest.approx(1.0)
    assert paired_difference([None], [1.0]) is None and bootstrap_ci([None, None]) is None
    assert bootstrap_ci([2.0, 2.0, 2.0]) == [2.0, 2.0]


def test_length_summary():
    assert length_summary([3, 1, 2, 10]) == {"mean": 4.0, "median": 2.5, "p90": 10, "max": 10} and length_summary([]) == {}


def test_across_seeds_the_interval_holds_the_seed_to_seed_spread():
    rng = random.Random(3)
    base = [rng.gauss(0, 1) for _ in range(80)]
    # every seed gains 0.5 on the same prompts, but the seeds disagree by ±0.4: wider than one seed's interval
    seeds = [[b + 0.5 + shift + rng.gauss(0, 0.1) for b in base] for shift in (-0.4, 0.0, 0.4)]
    result = seeded_paired_difference(seeds, [base] * 3)
    assert result["difference"] == pytest.approx(0.5, abs=0.05) and result["seeds"] == 3 and result["prompts"] == 80
    assert result["per_seed"] == pytest.approx([0.1, 0.5, 0.9], abs=0.05)
    lo, hi = result["ci95"]
    one = paired_difference(seeds[1], base)["ci95"]
    assert lo < 0.5 < hi and hi - lo > 5 * (one[1] - one[0])
    # a prompt that one run lacks is left out of every run
    gappy = seeded_paired_difference([[1.0, None, 3.0], [2.0, 2.0, 2.0]], [[0.0, 0.0, 0.0]] * 2)
    assert gappy["prompts"] == 2 and gappy["per_seed"] == [2.0, 2.0]


def test_the_seeds_interval_covers_what_resampling_three_seeds_misses():
    """Seeds that differ as much as one seed's prompts vary: resampling three seeds covers the method's true
    difference far less often than 95% of the time; the t interval over the seeds' own differences does."""
    rng = random.Random(5)
    trials, bootstrap, over_seeds = 150, 0, 0
    for trial in range(trials):
        base = [rng.gauss(0, 1) for _ in range(40)]
        runs = [[b + 0.5 + shift + rng.gauss(0, 1) for b in base] for shift in [rng.gauss(0, 0.5) for _ in range(3)]]
        result = seeded_paired_difference(runs, [base] * 3, resamples=300, seed=trial)
        bootstrap += result["ci95"][0] <= 0.5 <= result["ci95"][1]
        over_seeds += result["ci95_seeds"][0] <= 0.5 <= result["ci95_seeds"][1]
    assert bootstrap / trials < 0.85 and over_seeds / trials >= 0.9, (bootstrap, over_seeds)


def test_the_seeds_interval_is_students_t():
    from scipy import stats

    assert T975 == pytest.approx([stats.t.ppf(0.975, df) for df in range(1, 31)], abs=5e-4)
    assert seed_interval([0.0, 1.0, 2.0]) == pytest.approx([1 - 4.303 / 3 ** 0.5, 1 + 4.303 / 3 ** 0.5], abs=1e-4)
    assert seed_interval([0.2, 0.2]) == [0.2, 0.2] and seed_interval([0.3]) is None


def test_length_control_removes_a_difference_made_only_by_length():
    rng = random.Random(4)
    base_len = [rng.randint(20, 400) for _ in range(300)]
    lengths = [round(n * math.exp(rng.gauss(0.3, 0.5))) for n in base_len]  # the row answers longer, mostly
    base = [rng.gauss(30, 5) for _ in range(300)]
    # its score gains 4 points per unit of log length ratio, and nothing else
    longer = [b + 4 * math.log((n + 1) / (m + 1)) + rng.gauss(0, 2) for b, n, m in zip(base, lengths, base_len)]
    raw = paired_difference(longer, base, lengths=(lengths, base_len))
    assert raw["ci95"][0] > 0.5  # the raw difference is length
    lc = raw["length_controlled"]
    assert lc["ci95"][0] < 0 < lc["ci95"][1] and lc["per_doubling"] == pytest.approx(4 * math.log(2), abs=0.6)
    # a real gain beside the length effect survives it, across seeds too
    seeds = [[v + 1.0 + rng.gauss(0, 0.5) for v in longer] for _ in range(3)]
    across = seeded_paired_difference(seeds, [base] * 3, lengths=([lengths] * 3, [base_len] * 3))
    assert across["length_controlled"]["difference"] == pytest.approx(1.0, abs=0.35)
    assert across["length_controlled"]["ci95"][0] > 0.3
    lc_seeds = across["length_controlled"]  # each seed's own line, and the t interval over their values at ratio 1
    assert lc_seeds["per_seed"] == pytest.approx([1.0] * 3, abs=0.5) and lc_seeds["ci95_seeds"][0] > 0
    assert lc_seeds["ci95_seeds"] == seed_interval(lc_seeds["per_seed"])
    # no lengths, no length control; equal lengths: the same as the raw difference
    assert "length_controlled" not in paired_difference(longer, base)
    same = paired_difference(longer, base, lengths=(base_len, base_len))["length_controlled"]
    assert same["difference"] == pytest.approx(raw["difference"], abs=1e-3) and same["per_doubling"] == 0
    # one row's answers always the longer: ratio 1 is outside the data, and no value is extrapolated to it
    assert "length_controlled" not in paired_difference(longer, base, lengths=([2 * n for n in base_len], base_len))
