"""Can the lab's namespaces (and the impairment wire's TUN devices) be made here?  If not: why, and the fix.

Each answer is one line naming the cause and the one command that fixes it, so a
notebook can print it next to its fallback (recorded data from ``data/``).  The
probe asks the kernel rather than guessing: it starts the lab's helper
(:mod:`nbconn.lab.child`) in probe mode, which tries exactly what the real helper
does first -- ``unshare()`` (a user + network namespace as a normal user, a network
namespace as root), ``lo`` up, and for the wire one TUN device -- and reports the
stage and errno that failed.  The known switches are then read to name the cause:

=====================================================  =============================================================
cause                                                  fix
=====================================================  =============================================================
``kernel.unprivileged_userns_clone=0`` (Debian knob)   ``sudo sysctl -w kernel.unprivileged_userns_clone=1``
``kernel.apparmor_restrict_unprivileged_userns=1``     ``sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0``
(Ubuntu 24.04)
``user.max_user_namespaces=0``                         ``sudo sysctl -w user.max_user_namespaces=15000``
a container's seccomp profile refuses ``unshare``      run it with ``--security-opt seccomp=unconfined``
``/dev/net/tun`` missing                               ``sudo mknod -m 0666 /dev/net/tun c 10 200``
``/dev/net/tun`` not 0666                              ``sudo chmod 0666 /dev/net/tun``
=====================================================  =============================================================

The result is cached per process (the probe costs one interpreter start, ~20-40 ms).
"""

from __future__ import annotations

import errno
import functools
import json
import os
import stat
import subprocess
import sys

_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "child.py")
_PROBE_S = 10.0


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _sysctl_cause() -> str | None:
    """A switch that turns unprivileged user namespaces off, with its fix; None if none is set."""
    if _read("/proc/sys/kernel/unprivileged_userns_clone") == "0":
        return ("unprivileged user namespaces are off (kernel.unprivileged_userns_clone=0); "
                "fix: sudo sysctl -w kernel.unprivileged_userns_clone=1")
    if _read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1":
        return ("AppArmor restricts unprivileged user namespaces (kernel.apparmor_restrict_unprivileged_userns=1); "
                "fix: sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0")
    if _read("/proc/sys/user/max_user_namespaces") == "0":
        return "user namespaces are off (user.max_user_namespaces=0); fix: sudo sysctl -w user.max_user_namespaces=15000"
    return None


def _tun_cause() -> str | None:
    try:
        st = os.stat("/dev/net/tun")
    except FileNotFoundError:
        return "/dev/net/tun is missing; fix: sudo mkdir -p /dev/net && sudo mknod -m 0666 /dev/net/tun c 10 200"
    except OSError as exc:
        return f"cannot stat /dev/net/tun ({exc.strerror})"
    if os.geteuid() != 0 and stat.S_IMODE(st.st_mode) & 0o006 != 0o006:
        return (f"/dev/net/tun is mode {stat.S_IMODE(st.st_mode):04o}, not 0666 as distributions ship it; "
                "fix: sudo chmod 0666 /dev/net/tun")
    return None


def _run_probe(want_tun: bool) -> dict:
    argv = [sys.executable, "-I", "-S", _CHILD, "probe"] + (["tun"] if want_tun else [])
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=_PROBE_S, stdin=subprocess.DEVNULL)
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError) as exc:
        return {"ok": False, "stage": "start", "errno": None, "error": f"the probe helper did not run: {exc!r}"}


def _explain(result: dict) -> str:
    stage, err, text = result.get("stage"), result.get("errno"), result.get("error", "")
    if stage in ("unshare", "uid_map"):
        cause = _sysctl_cause()
        if cause:
            return cause
        if err in (errno.EPERM, errno.EACCES):
            return ("unshare(CLONE_NEWUSER|CLONE_NEWNET) is refused (a container whose seccomp profile forbids it?); "
                    "fix: run the container with --security-opt seccomp=unconfined")
        if err == errno.ENOSPC:
            return "the limit of user namespaces is reached; fix: sudo sysctl -w user.max_user_namespaces=15000"
        if err == errno.EINVAL:
            return "this kernel has no user or network namespaces (CONFIG_USER_NS / CONFIG_NET_NS off)"
    if stage == "tun":
        cause = _tun_cause()
        if cause:
            return cause
        if err == errno.ENOENT or err == errno.ENODEV:
            return "the kernel has no TUN driver loaded; fix: sudo modprobe tun"
    return f"the lab helper failed at {stage}: {text}"


@functools.lru_cache(maxsize=None)
def namespace_unavailable_reason() -> str | None:
    """None if :func:`nbconn.lab.namespace` can run here, else one line: the cause and its fix."""
    if not sys.platform.startswith("linux"):
        return f"the lab's namespaces need Linux (this is {sys.platform})"
    result = _run_probe(want_tun=False)
    return None if result.get("ok") else _explain(result)


@functools.lru_cache(maxsize=None)
def wire_unavailable_reason() -> str | None:
    """None if :func:`nbconn.lab.impaired` can run here, else one line: the cause and its fix."""
    if not sys.platform.startswith("linux"):
        return f"the impairment wire needs Linux (this is {sys.platform})"
    cause = _tun_cause()
    if cause:
        return cause
    result = _run_probe(want_tun=True)
    return None if result.get("ok") else _explain(result)
