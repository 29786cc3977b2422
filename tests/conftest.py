"""Shared test helpers: the one polling helper (:func:`wait_for`), the one descriptor count (:func:`open_fds`,
:func:`fds_left`, the ``no_fd_leak`` fixture), and "this test needs tool X".

No test mocks the kernel: every socket is real and every peer listens on
loopback, an AF_UNIX path or inside a network namespace the test made.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time

import pytest
from hypothesis import settings as hypothesis_settings

# -- hypothesis: the same draws on every CI run, new ones on every local run ------------------------
# A property test that draws new examples each run can fail CI on a change that touched nothing near it
# (issue 24, item 13).  In CI (CI=true, as .ci/run and most CI services set it) the draws are derandomized --
# a fixed sequence, the same on every run -- and the example database is off, so a failure names its
# example and reproduces on a clean clone.  Locally the random search goes on finding new cases
# (HYPOTHESIS_PROFILE=ci picks CI's draws by hand).
hypothesis_settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
hypothesis_settings.register_profile("dev")
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE")
                                 or ("ci" if os.environ.get("CI", "").lower() in ("true", "1") else "dev"))


def wait_for(predicate, timeout_s: float = 10.0, *, interval_s: float = 0.01):
    """The one polling helper: ``predicate()`` until it is truthy or ``timeout_s`` has passed, bounded in count
    and time.  Returns the last value, so ``assert wait_for(...)`` fails when the event never came.  Poll only
    for what has no event to wait on (another thread's or process's progress, a file being written)."""
    deadline = time.monotonic() + timeout_s
    for _ in range(int(timeout_s / interval_s) + 2):
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval_s)
    return predicate()


def open_fds() -> set[int]:
    """The descriptors this process holds right now (not the listing's own directory descriptor, which shows
    up in the listing and is closed by the time we look)."""
    return {int(name) for name in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{name}")}


def fds_left(before: set[int], within_s: float = 2.0) -> set[int]:
    """Descriptors open now that were not in ``before``, waiting up to ``within_s`` for the set to empty: the lab
    peers' accept threads close what they accepted a moment later.  (Descriptors of ``before`` that are gone --
    the peers' transient ones -- do not count.)"""
    left: set[int] = set()

    def none_left() -> bool:
        left.clear()
        left.update(open_fds() - before)
        return not left

    wait_for(none_left, within_s)
    return left


def require_tool(name: str) -> str:
    """Path of a system tool; skip (or, in CI, fail) when it is missing."""
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    if path is None:
        message = f"{name} is not installed (apt-get install {name})"
        if os.environ.get("NBCONN_REQUIRE_TOOLS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path


def require_root(reason: str) -> None:
    """Skip (with the reason, one line) when not root -- also in CI: .ci/run runs the suite as an
    unprivileged user on purpose, and there root-only tests are expected to skip, not fail."""
    if os.geteuid() != 0:
        pytest.skip(f"needs root: {reason}")


def would_query_dns(target) -> bool:
    """True when nbconn would resolve ``target`` through DNS (this machine's resolver is not on loopback),
    so generated inputs can steer clear of it; "localhost" comes from /etc/hosts."""
    from nbconn.targets import is_hostname

    if isinstance(target, tuple) and len(target) == 2 and isinstance(target[0], str):
        host = target[0]
    elif isinstance(target, str) and not target.startswith(("unix:", "[")):
        host = target.rpartition(":")[0]
    else:
        return False
    return is_hostname(host) and host != "localhost"


@contextlib.contextmanager
def sigint_default():
    """Children started inside this block begin with SIGINT at its default disposition, whatever this run inherited.

    A suite started in the background (``nohup ./dev test &``, a CI runner) may inherit SIGINT *ignored*, and an
    ignored signal stays ignored across fork and execve, so a child would never see the Ctrl-C a test sends it
    (signal(7): "a child created via fork(2) inherits a copy of its parent's signal dispositions.  During an
    execve(2), the dispositions of handled signals are reset to the default; the dispositions of ignored signals
    are left unchanged").  So for the block this process *handles* SIGINT (Python's default handler): a handled
    signal is reset to the default by execve.  No preexec_fn: it is not safe with the lab peers' threads running.
    Call from the main thread (signal.signal's rule), around the Popen/run only.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.fixture
def no_fd_leak():
    """Fails the test if it leaves descriptors open that it did not have before."""
    before = open_fds()
    yield
    import gc

    gc.collect()
    leaked = fds_left(before)
    assert not leaked, f"descriptors leaked: {sorted(leaked)} -> {[os.readlink(f'/proc/self/fd/{fd}') for fd in leaked]}"


# -- timing: deadline assertions scale with how late this machine wakes up right now ---------------

_LOOP_LATENESS_MS: list[float] = []


def loop_lateness_ms() -> float:
    """The p90 lateness of 20 short epoll timers (2 ms), measured once per test session.

    On a quiet machine this is ~0.1 ms; on 2 cores shared by eight test runs it can be
    tens of ms.  Deadline assertions allow a multiple of it, so they test the code, not the load.
    """
    if not _LOOP_LATENESS_MS:
        import time

        from nbconn.loop import Loop

        class Wake:
            fired = False

            def on_timer(self):
                self.fired = True

        late = []
        with Loop() as loop:
            for _ in range(20):
                wake, deadline = Wake(), time.monotonic_ns() + 2_000_000
                loop.call_at(deadline, wake)
                while not wake.fired:
                    loop.run_once()
                late.append((time.monotonic_ns() - deadline) / 1e6)
        late.sort()
        _LOOP_LATENESS_MS.append(late[int(0.9 * len(late))])
    return _LOOP_LATENESS_MS[0]


def pytest_configure(config):
    config.addinivalue_line("markers", "timing: a deadline assertion; its tolerance scales with the loop-latency "
                                       "baseline measured once at session start (fixture late_tolerance_ms)")


@pytest.fixture(scope="session")
def late_tolerance_ms():
    """``late_tolerance_ms(quiet_ms)``: the allowed lateness, ``quiet_ms`` on a quiet machine, more under load."""
    baseline = loop_lateness_ms()

    def tolerance(quiet_ms: float) -> float:
        # 1 ms of baseline lateness is "quiet"; beyond it, scale the budget with it (plus 10 baselines of headroom)
        return quiet_ms * max(1.0, baseline) + 10 * baseline

    return tolerance
