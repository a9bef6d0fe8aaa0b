"""--suggest: the smallest LoRA setting (fewest trainable parameters, then lowest rank) whose mean held-out
result is within a margin of the best, at the largest data size the study ran, with the table behind it."""
from __future__ import annotations

from dataclasses import dataclass

from .results import Metric, largest_size


@dataclass(frozen=True)
class Suggestion:
    """The chosen cell, the best one, and every candidate (fewest trainable parameters first)."""

    chosen: dict
    best: dict
    margin: float
    candidates: list[dict]
    metric: Metric

    def within(self, cell: dict) -> bool:
        return within_margin(cell, self.best, self.margin, self.metric)


def within_margin(cell: dict, best: dict, margin: float, metric: Metric) -> bool:
    """Whether the cell's mean is at most `margin` worse than the best's (in the metric's own units)."""
    gap = best["metric"] - cell["metric"] if metric.higher_is_better else cell["metric"] - best["metric"]
    return gap <= margin + 1e-12


def suggest(cells: list[dict], metric: Metric, margin: float) -> Suggestion | None:
    """Among LoRA cells at the largest data size: the best, and the smallest within `margin` of it."""
    lora = [c for c in cells if not c["full"]]
    if not lora:
        return None
    size = largest_size(lora)
    candidates = sorted((c for c in lora if c["data_size"] == size), key=lambda c: (c["trainable"], c["rank"]))
    best = candidates[0]
    for c in candidates[1:]:
        if metric.better(c["metric"], best["metric"]):
            best = c
    chosen = next(c for c in candidates if within_margin(c, best, margin, metric))
    return Suggestion(chosen, best, margin, candidates, metric)
