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
        assert reason is None or (reason and "\n" not in reason and "fix:" in reason or "failed at" in reason)


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


@pytest.mark.parametrize(("mode", "exists", "expected"), [
    (0o600, True, "sudo chmod 0666 /dev/net/tun"),
    (None, False, "mknod -m 0666 /dev/net/tun c 10 200"),
])
def test_tun_causes(monkeypatch, mode, exists, expected):
    if os.geteuid() == 0 and exists:
        monkeypatch.setattr(os, "geteuid", lambda: 1001)  # the mode matters to a normal user only
    real_stat = os.stat

    def fake_stat(path, *args, **kwargs):
        if path != "/dev/net/tun":
            return real_stat(path, *args, **kwargs)
        if not exists:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        st = real_stat(path)
        return os.stat_result((0o020000 | mode, *tuple(st)[1:]))

    monkeypatch.setattr(os, "stat", fake_stat)
    assert expected in probe._tun_cause()
    assert expected in probe._explain({"ok": False, "stage": "tun", "errno": errno.EACCES, "error": "denied"})
