"""nbconn.lab.probe: where the lab's namespaces cannot be made, one line names the cause and the command that fixes it.

The live probe runs on this machine; the causes this machine does not have (user namespaces
switched off, AppArmor's restriction, a seccomp filter, /dev/net/tun missing or 0600) are
fed to the decision as the probe would report them, with the switches' files read as given.
"""

from __future__ import annotations

import errno
import os

import pytest

from nbconn.lab import probe


def test_live_probe_is_none_or_one_line():
    for reason in (probe.namespace_unavailable_reason(), probe.wire_unavailable_reason()):
        # one line, naming the fix or the step that failed (the parentheses are the point: without them any
        # text with "failed at" passed, multi-line or not)
        assert reason is None or (reason and "\n" not in reason and ("fix:" in reason or "failed at" in reason))


EPERM_AT_UNSHARE = {"ok": False, "stage": "unshare", "errno": errno.EPERM, "error": "unshare: Operation not permitted"}


@pytest.mark.parametrize(("files", "expected"), [
    ({"/proc/sys/kernel/unprivileged_userns_clone": "0"}, "sudo sysctl -w kernel.unprivileged_userns_clone=1"),
    ({"/proc/sys/kernel/apparmor_restrict_unprivileged_userns": "1"},
     "sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0"),
    ({"/proc/sys/user/max_user_namespaces": "0"}, "sudo sysctl -w user.max_user_namespaces=15000"),
    ({}, "--security-opt seccomp=unconfined"),  # EPERM with every switch on: a seccomp filter
])
def test_each_cause_names_its_fix(monkeypatch, files, expected):
    monkeypatch.setattr(probe, "_read", lambda path: files.get(path))
    reason = probe._explain(EPERM_AT_UNSHARE)
    assert expected in reason and "\n" not in reason


def test_tun_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(probe, "_TUN", str(tmp_path / "no-tun"))
    assert "mknod -m 0666" in probe._tun_cause() and "mknod -m 0666" in probe._explain(TUN_DENIED)


TUN_DENIED = {"ok": False, "stage": "tun", "errno": errno.EACCES, "error": "denied"}

# _tun_cause() run with this user's ids dropped to `nobody`'s (euid, egid, groups: root can set them), so
# the kernel answers the access question as it would for that user.
AS_NOBODY = """
import os, sys
from nbconn.lab import probe
probe._TUN, uid, gid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.setgroups([gid]); os.setegid(gid); os.seteuid(uid)
print(probe._tun_cause())
"""


@pytest.mark.parametrize(("mode", "usable"), [(0o660, True), (0o600, False), (0o640, False),
                                             (0o606, False)])  # in the group: the group's bits decide, not others'

def test_tun_check_asks_for_access_not_mode_bits(mode, usable):
    """/dev/net/tun 0660 with the user in its group is usable (issue 24, item 10: it was refused as "not 0666").

    A file stands in for the device (access(2) reads the same inode permissions).  As root the check runs in a
    child with nobody's ids and the file in nobody's group; as a normal user the file is the user's own."""
    import pwd
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        os.chmod(tmp, 0o755)
        tun = os.path.join(tmp, "tun")
        open(tun, "w").close()
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(tun, 0, nobody.pw_gid)  # owner root, group nobody's: only the group bits can let it in
            os.chmod(tun, mode)
            proc = subprocess.run([sys.executable, "-c", AS_NOBODY, tun, str(nobody.pw_uid), str(nobody.pw_gid)],
                                  capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0, proc.stderr[-1000:]
            cause = proc.stdout.strip()
            cause = None if cause == "None" else cause
        else:
            os.chmod(tun, (mode & 0o070) << 3 | (mode & 0o007))  # the group's bits as the owner's own
            original = probe._TUN
            probe._TUN = tun
            try:
                cause = probe._tun_cause()
            finally:
                probe._TUN = original
    if usable:
        assert cause is None
    else:
        assert cause and "may not open it" in cause and "sudo chmod 0666" in cause and "\n" not in cause


# -- "cannot run here" is not remembered (issue 24, item 5) --------------------------------------------------

EMFILE_THEN_NOT = """
import json, os, resource
from nbconn.lab import probe
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 1, hard))  # no room for the pipes
during = probe.namespace_unavailable_reason()
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
print(json.dumps([during, probe.namespace_unavailable_reason()]))
"""


def test_a_passing_emfile_during_the_probe_is_not_remembered():
    """The probe failed for want of descriptors; once they are back, the same process is told the lab runs."""
    import json
    import subprocess
    import sys

    if probe.namespace_unavailable_reason() is not None:
        pytest.skip(f"the lab cannot run here at all: {probe.namespace_unavailable_reason()}")
    proc = subprocess.run([sys.executable, "-c", EMFILE_THEN_NOT], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-1000:]
    during, after = json.loads(proc.stdout)
    assert during and "Too many open files" in during
    assert after is None


def test_a_fixed_cause_is_seen_at_once(monkeypatch):
    """The printed fix applied (a sysctl raised, a device chmod'ed): the next call probes again."""
    answers = [{"ok": False, "stage": "unshare", "errno": errno.ENOSPC, "error": "unshare: No space left on device"},
               {"ok": True}]
    calls = []

    def fake_probe(want_tun):
        calls.append(want_tun)
        return answers[min(len(calls), len(answers)) - 1]

    monkeypatch.setattr(probe, "_run_probe", fake_probe)
    monkeypatch.setattr(probe, "_read", lambda path: None)
    monkeypatch.setattr(probe, "_RUNS_HERE", set())
    assert "max_user_namespaces" in probe.namespace_unavailable_reason()
    assert probe.namespace_unavailable_reason() is None
    assert probe.namespace_unavailable_reason() is None and len(calls) == 2  # "it runs" is remembered
