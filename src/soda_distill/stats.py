"""Summary statistics of the records and results."""

from __future__ import annotations

import statistics


def length_summary(values: list[int]) -> dict:
    """Mean, median, 90th percentile and maximum of a list of lengths; {} for none."""
    if not values:
        return {}
    ordered = sorted(values)
    return {
        "mean": round(statistics.fmean(values), 1),
        "median": statistics.median(values),
        "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
        "max": ordered[-1],
    }


RESAMPLES = 2000  # bootstrap resamples: the 95% interval's ends move by well under a tenth of its width beyond this
# Student's t, its 0.975 quantile for 1 to 30 degrees of freedom (beyond: the normal's 1.96)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def _usable(*columns):
    """Positions where every column has a value (a prompt without a reference has no ROUGE-L, for example)."""
    import numpy as np

    keep = [i for i in range(len(columns[0])) if all(c[i] is not None for c in columns)]
    return [np.asarray([c[i] for i in keep], dtype=np.float64) for c in columns]


def bootstrap_ci(values: list, resamples: int = RESAMPLES, seed: int = 0) -> list[float] | None:
    """Percentile bootstrap 95% interval of the mean over prompts (None values left out); None for no values."""
    import numpy as np

    (x,) = _usable(values)
    if not len(x):
        return None
    means = x[np.random.default_rng(seed).integers(0, len(x), (resamples, len(x)))].mean(axis=1)
    return [round(float(v), 4) for v in np.percentile(means, [2.5, 97.5])]


def paired_difference(x: list, y: list, resamples: int = RESAMPLES, seed: int = 0,
                      lengths: tuple[list, list] | None = None) -> dict | None:
    """mean(x − y) over the prompts both have, with a paired percentile bootstrap 95% interval: prompts are resampled
    together, so what the two share (a prompt's difficulty) cancels. None when no prompt has both. With `lengths`
    (each answer's length in x and in y), also the difference at equal length (`length_controlled`)."""
    a, b = _usable(x, y)
    if not len(a):
        return None
    diff = (a - b).tolist()
    out = {"difference": round(float((a - b).mean()), 4), "ci95": bootstrap_ci(diff, resamples, seed), "prompts": len(diff)}
    return {**out, **_length_controlled([x], [y], lengths and ([lengths[0]], [lengths[1]]), resamples, seed, seeds=False)}


def seed_interval(per_seed: list[float]) -> list[float] | None:
    """Student's t 95% interval of the mean of the seeds' own differences: where the method's mean difference lies,
    not only these trained models'. None for one seed."""
    k = len(per_seed)
    if k < 2:
        return None
    mean = statistics.fmean(per_seed)
    half = (T975[k - 2] if k <= 31 else 1.96) * statistics.stdev(per_seed) / k ** 0.5
    return [round(mean - half, 4), round(mean + half, 4)]


def seeds_interval_of(difference: dict) -> list[float] | None:
    """An across-seeds difference's t interval: its own, or from its seeds' differences where it was written before
    `ci95_seeds` was."""
    return difference.get("ci95_seeds") or seed_interval(difference.get("per_seed", []))


def seeded_paired_difference(x_by_seed: list[list], y_by_seed: list[list], resamples: int = RESAMPLES,
                             seed: int = 0, lengths: tuple[list[list], list[list]] | None = None) -> dict | None:
    """mean(x − y) over several seeds' runs on the same prompts, with a two-level bootstrap 95% interval (the seeds
    resampled, and the prompts, the same draw for every seed), each seed's own mean difference, and the t interval
    over those (`ci95_seeds`: resampling a few seeds cannot reach past their range, so the bootstrap's interval holds
    the prompts' spread, not all of the seeds'). None when no prompt has a value in every run. With `lengths` (each
    seed's answer lengths of x and of y), also the difference at equal length."""
    import numpy as np

    columns = _usable(*x_by_seed, *y_by_seed)
    if not len(columns[0]):
        return None
    n = len(x_by_seed)
    diff = np.stack(columns[:n]) - np.stack(columns[n:])  # seeds × prompts
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, diff.shape[1], (resamples, diff.shape[1]))
    seeds = rng.integers(0, n, (resamples, n))
    per_seed = diff[:, prompts].mean(axis=2)  # seeds × resamples: each seed's mean over each prompt draw
    means = np.take_along_axis(per_seed.T, seeds, axis=1).mean(axis=1)
    each = [round(float(d), 4) for d in diff.mean(axis=1)]
    return {"difference": round(float(diff.mean()), 4), "ci95": [round(float(v), 4) for v in np.percentile(means, [2.5, 97.5])],
            "prompts": diff.shape[1], "seeds": n, "per_seed": each, "ci95_seeds": seed_interval(each),
            **_length_controlled(x_by_seed, y_by_seed, lengths, resamples, seed, seeds=True)}


def _fit_at_equal_length(diff, log_ratio):
    """Intercept and slope of the least-squares line diff = a + b·log_ratio over the last two axes (seeds × prompts)
    of each leading index: a is the difference where both answers have the same length. The slope is 0 where the log
    ratios do not vary."""
    import numpy as np

    d = diff.reshape(*diff.shape[:-2], -1)
    r = log_ratio.reshape(*log_ratio.shape[:-2], -1)
    centred = r - r.mean(axis=-1, keepdims=True)
    variance = (centred ** 2).sum(axis=-1)
    covariance = (centred * (d - d.mean(axis=-1, keepdims=True))).sum(axis=-1)
    slope = np.where(variance > 1e-12, covariance / np.maximum(variance, 1e-12), 0.0)
    return d.mean(axis=-1) - slope * r.mean(axis=-1), slope


def _length_controlled(x_by_seed, y_by_seed, lengths, resamples: int, seed: int, seeds: bool) -> dict:
    """In the spirit of AlpacaEval's length control, for a paired difference: each prompt's difference fitted (least
    squares) against the log ratio of the two answers' lengths, reported at ratio 1 (`difference`) with a bootstrap
    95% interval (prompts, and seeds where `seeds`, resampled and the line fitted again), the fitted change per
    doubling of the ratio (`per_doubling`) and, where `seeds`, each seed's value and the t interval over them. {}
    without lengths, or where no prompt's ratio is on each side of 1."""
    import numpy as np

    if lengths is None:
        return {}
    n = len(x_by_seed)
    columns = _usable(*x_by_seed, *y_by_seed, *lengths[0], *lengths[1])
    if not len(columns[0]):
        return {}
    x, y, lx, ly = (np.stack(columns[k * n:(k + 1) * n]) for k in range(4))  # each seeds × prompts
    diff, log_ratio = x - y, np.log((lx + 1) / (ly + 1))  # +1: an empty answer has a length
    if log_ratio.min() > 0 or log_ratio.max() < 0:  # one row's answers always the longer: ratio 1 is not in the data,
        return {}  # and the fitted line's value there an extrapolation
    at_equal, slope = _fit_at_equal_length(diff, log_ratio)
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, diff.shape[1], (resamples, 1, diff.shape[1]))
    runs = rng.integers(0, n, (resamples, n, 1)) if seeds else np.arange(n)[None, :, None]
    fits, _ = _fit_at_equal_length(diff[runs, prompts], log_ratio[runs, prompts])  # resamples × seeds × prompts
    out = {"difference": round(float(at_equal), 4), "ci95": [round(float(v), 4) for v in np.percentile(fits, [2.5, 97.5])],
           "per_doubling": round(float(slope) * float(np.log(2)), 4)}
    if seeds:  # each seed's own line, and the t interval over their values at ratio 1
        each = [round(float(v), 4) for v in _fit_at_equal_length(diff[:, None, :], log_ratio[:, None, :])[0]]
        out.update(per_seed=each, ci95_seeds=seed_interval(each))
    return {"length_controlled": out}
