"""nbconn.systools: as root a tool is found in the system directories only, never through PATH."""

import os

from nbconn import systools


def test_root_ignores_path_a_user_follows_it(tmp_path, monkeypatch):
    fake = tmp_path / "ip"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ.get('PATH', '')}")
    found = systools.find("ip")
    if os.geteuid() == 0:
        assert found is None or os.path.dirname(found) in systools.SYSTEM_DIRS
    else:
        assert found == str(fake)
    assert systools.find("no-such-tool-anywhere") is None
