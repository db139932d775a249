"""The comparison table: one row per measurement, ours against a reference (the peer or a baseline)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Row:
    """Rates (higher is better) of ours and a reference; `ratio` is ours over ref, measured round by
    round (the median of the rounds' ratios); target is the ratio to reach."""

    section: str
    work: str
    unit: str
    ref_label: str
    ref: float
    ours: float
    ratio: float
    target: float | None = None
    extra: str = ""  # e.g. the same rates in images/s

    @property
    def met(self) -> str:
        if self.target is None:
            return ""
        return "yes" if self.ratio >= self.target else "**no**"


def _number(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def markdown(rows: list[Row]) -> str:
    """The table as GitHub markdown."""
    lines = ["| stage | work | unit | reference | ref | ours | ours/ref | target | met |",
             "|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        target = f">= {r.target:g}x" if r.target is not None else ""
        work = f"{r.work} ({r.extra})" if r.extra else r.work
        lines.append(f"| {r.section} | {work} | {r.unit} | {r.ref_label} | {_number(r.ref)} | "
                     f"{_number(r.ours)} | {r.ratio:.2f}x | {target} | {r.met} |")
    return "\n".join(lines)
