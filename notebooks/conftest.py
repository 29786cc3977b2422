"""nbval's check of the stored outputs (``./dev test``), for notebooks whose outputs need the lab's link.

These notebooks' stored outputs were recorded where the impairment wire runs (user + network namespaces and a
TUN device from /dev/net/tun).  Where it cannot run -- most often /dev/net/tun mode 0600 for a normal user --
every link cell falls back visibly (recorded data, or the one-line reason), so its output differs from the stored
one and nbval would report each such cell as a failure.  Those are not defects of the notebook: like the tests
whose system tool is missing, the notebook is skipped with one line naming the cause and its fix
(``nbconn.lab.wire_unavailable_reason()``).  Where NBCONN_REQUIRE_TOOLS=1 (``.ci/run``, whose user leg makes
/dev/net/tun 0666) nothing is skipped: there the notebooks must be checked.
"""

from __future__ import annotations

import os

import pytest

# The notebooks whose stored outputs differ from their fallback's when the link cannot run (found by running
# ./dev test as uid 1000 with /dev/net/tun 0600); tests/test_notebooks_meta.py checks each still exists.
NEEDS_LINK = ("04_connect", "08_distributions", "11_packets", "12_happy_eyeballs", "13_keepalive", "15_tls")


def _needs_link(item) -> bool:
    path = getattr(item, "path", None)
    return path is not None and path.suffix == ".ipynb" and path.stem in NEEDS_LINK


def pytest_collection_modifyitems(config, items):
    if os.environ.get("NBCONN_REQUIRE_TOOLS") == "1":
        return  # CI: a missing link is a failure, not a skip
    if not any(_needs_link(item) for item in items):
        return  # no probe when no such notebook is collected
    from nbconn.lab import wire_unavailable_reason

    reason = wire_unavailable_reason()
    if reason is None:
        return
    for item in items:
        if _needs_link(item):
            item.add_marker(pytest.mark.skip(
                reason=f"{item.path.stem}'s stored outputs need the lab's link, which cannot run here: {reason}"))
