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


def paired_difference(x: list, y: list, resamples: int = RESAMPLES, seed: int = 0) -> dict | None:
    """mean(x − y) over the prompts both have, with a paired percentile bootstrap 95% interval: prompts are resampled
    together, so what the two share (a prompt's difficulty) cancels. None when no prompt has both."""
    a, b = _usable(x, y)
    if not len(a):
        return None
    diff = (a - b).tolist()
    return {"difference": round(float((a - b).mean()), 4), "ci95": bootstrap_ci(diff, resamples, seed), "prompts": len(diff)}


def seeded_paired_difference(x_by_seed: list[list], y_by_seed: list[list], resamples: int = RESAMPLES,
                             seed: int = 0) -> dict | None:
    """mean(x − y) over several seeds' runs on the same prompts, with a two-level bootstrap 95% interval: the seeds
    are resampled, and the prompts (the same draw for every seed), so the interval holds the seed-to-seed spread as
    well as the prompts'. Each seed's own mean difference is listed. None when no prompt has a value in every run."""
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
    return {"difference": round(float(diff.mean()), 4), "ci95": [round(float(v), 4) for v in np.percentile(means, [2.5, 97.5])],
            "prompts": diff.shape[1], "seeds": n, "per_seed": [round(float(d), 4) for d in diff.mean(axis=1)]}
