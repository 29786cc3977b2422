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
``/dev/net/tun`` not open to the user (read+write)     ``sudo chmod 0666 /dev/net/tun``
=====================================================  =============================================================

"It can run" is remembered for the process (the probe costs one interpreter start, ~20-40 ms); "it cannot"
is asked again on every call, so a fix applied, or a passing shortage (EMFILE), shows at once.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys

_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "child.py")
_PROBE_S = 10.0
_TUN = "/dev/net/tun"  # the TUN clone device (Documentation/networking/tuntap.rst)


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
    """Why this user cannot open the TUN clone device, with the fix; None if it can."""
    try:
        st = os.stat(_TUN)
    except FileNotFoundError:
        return f"{_TUN} is missing; fix: sudo mkdir -p /dev/net && sudo mknod -m 0666 {_TUN} c 10 200"
    except OSError as exc:
        return f"cannot stat {_TUN} ({exc.strerror})"
    # Access, not mode bits: 0660 with this user in the device's group is usable, and so is an ACL
    # entry.  The kernel answers for this user's effective ids and groups (faccessat(2), AT_EACCESS).
    if not os.access(_TUN, os.R_OK | os.W_OK, effective_ids=os.access in os.supports_effective_ids):
        return (f"{_TUN} is mode {stat.S_IMODE(st.st_mode):04o} (owner {st.st_uid}, group {st.st_gid}) and this user "
                f"may not open it for reading and writing; fix: sudo chmod 0666 {_TUN} (as distributions ship it)")
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


# Only "it runs here" is remembered.  A "cannot" is asked again on every call: its cause can go away
# while this process lives -- the descriptor limit that made the probe fail with EMFILE is raised, the
# printed fix (a sysctl, a chmod) is applied -- and a notebook kernel lives for hours.  Asking again costs one
# probe (~20-40 ms), and only where the lab cannot run anyway.
_RUNS_HERE: set = set()


def namespace_unavailable_reason() -> str | None:
    """None if :func:`nbconn.lab.namespace` can run here, else one line: the cause and its fix."""
    if not sys.platform.startswith("linux"):
        return f"the lab's namespaces need Linux (this is {sys.platform})"
    if "namespace" in _RUNS_HERE:
        return None
    result = _run_probe(want_tun=False)
    if result.get("ok"):
        _RUNS_HERE.add("namespace")
        return None
    return _explain(result)


def wire_unavailable_reason() -> str | None:
    """None if :func:`nbconn.lab.impaired` can run here, else one line: the cause and its fix."""
    if not sys.platform.startswith("linux"):
        return f"the impairment wire needs Linux (this is {sys.platform})"
    if "wire" in _RUNS_HERE:
        return None
    cause = _tun_cause()
    if cause:
        return cause
    result = _run_probe(want_tun=True)
    if result.get("ok"):
        _RUNS_HERE.add("wire")
        return None
    return _explain(result)
