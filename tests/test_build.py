"""The build's dependency check: one clear message naming the Debian package."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_setup(env_changes, tmp_path):
    env = dict(os.environ)
    env.update(env_changes)
    # --name only evaluates setup.py (and its library checks); nothing is compiled
    return subprocess.run([sys.executable, str(ROOT / "setup.py"), "--name"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)


def test_missing_libraries_name_the_debian_packages(tmp_path):
    r = run_setup({"PKG_CONFIG_LIBDIR": str(tmp_path), "PKG_CONFIG_PATH": ""}, tmp_path)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "datago build error" in out
    assert "apt-get install -y libturbojpeg0-dev" in out
    assert "Traceback" not in out


def test_missing_pkg_config_names_it(tmp_path):
    # a PATH with python but without pkg-config
    bindir = tmp_path / "bin"
    bindir.mkdir()
    os.symlink(sys.executable, bindir / "python3")
    r = run_setup({"PATH": str(bindir)}, tmp_path)
    if shutil.which("pkg-config", path=str(bindir)):
        pytest.skip("pkg-config still reachable")
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "apt-get install -y pkg-config" in out and "Traceback" not in out


def test_present_libraries_pass_the_check(tmp_path):
    r = run_setup({}, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "datago"
