"""Shared by the test files: the real CLI run as a subprocess, and a small synthetic data set."""
import os
import subprocess
import sys

import pytest

import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args):
    """python r2rank.py ARGS from the repository root; returns the CompletedProcess (text output)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "r2rank.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    """The built-in synthetic set with 40 users (32 / 4 / 4), built once per test module."""
    path = tmp_path_factory.mktemp("synthetic") / "data"
    data.build_synthetic(str(path), users=40, seed=0)
    return str(path)
