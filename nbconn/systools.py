"""Where a system tool (ip, nginx, strace, sysctl, unshare) is: one rule for every module that runs one.

As root a program is run by absolute path from the system directories only, never looked
up through PATH: a PATH entry writable by someone else (a venv's bin, ~/.local/bin, ".")
would otherwise choose what runs with every privilege.  A normal user gets PATH first (a
tool in their own prefix is theirs to run), then the same system directories (sbin is
often missing from a normal user's PATH).
"""

from __future__ import annotations

import os
import shutil

SYSTEM_DIRS = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")


def find(name: str) -> str | None:
    """Absolute path of the tool ``name``, or None if it is not installed."""
    if os.geteuid() != 0:
        found = shutil.which(name)
        if found:
            return os.path.abspath(found)
    for directory in SYSTEM_DIRS:
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None
