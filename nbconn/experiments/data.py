"""The recorded datasets shipped in ``data/`` (see data/README.md and :mod:`nbconn.experiments.record`).

``load(name)`` returns a :class:`nbconn.experiments.measure.Measurement` for connect runs
(its ``meta`` holds the provenance), or a dict with ``provenance`` and the
SYN-retransmission ``runs`` for the SYN datasets.
"""

from __future__ import annotations

import json
import os

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "data")


def available() -> list[str]:
    """Names of the datasets present in data/."""
    if not os.path.isdir(DATA_DIR):
        return []
    return sorted(name[:-5] for name in os.listdir(DATA_DIR) if name.endswith(".json"))


def load_raw(name: str) -> dict:
    path = os.path.join(DATA_DIR, f"{name}.json")
    if name not in available():
        raise ValueError(f"no dataset {name!r} in {DATA_DIR} (available: {', '.join(available()) or 'none'})")
    with open(path) as f:
        return json.load(f)


def load(name: str):
    """A Measurement (connect runs) or {"provenance", "sysctls", "runs"} (SYN schedules)."""
    raw = load_raw(name)
    data = raw["data"]
    if "columns" in data:
        from .measure import Measurement

        m = Measurement.from_dict(data)
        m.meta = raw["provenance"]
        return m
    return {"provenance": raw["provenance"], **data}
