"""``pip install .`` (not editable) gives a working ``pvhub`` command and ``pvhub.client``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(180)
def test_wheel_install_has_command_and_namespaces(tmp_path):
    target = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet",
         "--target", str(target), str(REPO)],
        capture_output=True, text=True, timeout=170,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    installed = {p.name for p in (target / "pvhub").iterdir()}
    assert {"client", "daemon", "actors", "protocol.py"} <= installed
    # Generic names stay inside the pvhub namespace.
    assert not (target / "client").exists() and not (target / "daemon").exists()
    env = {**os.environ, "PYTHONPATH": str(target)}
    probe = subprocess.run(
        [sys.executable, "-c",
         "import pvhub.client, pvhub.daemon, pvhub.actors, pvhub.client.ophyd_async, pvhub; print(pvhub.client.__file__)"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.startswith(str(target))
    script = target / "bin" / "pvhub"
    assert script.exists()
    version = subprocess.run([sys.executable, str(script), "--version"], capture_output=True,
                             text=True, env=env, cwd=tmp_path, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("pvhub ")
