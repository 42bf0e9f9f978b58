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
