"""Process-level settings: the OpenMP wait policy the CLI asks for, without overriding the user."""

from __future__ import annotations

import os
import subprocess
import sys

from napari_whatishealthy.core.runtime import prefer_passive_omp_wait


def test_passive_wait_is_set_only_when_the_user_chose_none():
    env: dict[str, str] = {}
    assert prefer_passive_omp_wait(env) and env["OMP_WAIT_POLICY"] == "PASSIVE"
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert not prefer_passive_omp_wait(env) and env["OMP_WAIT_POLICY"] == "ACTIVE"


def test_the_cli_sets_it_before_torch_is_imported():
    code = ("import os, sys; from napari_whatishealthy import cli; before = 'torch' in sys.modules; "
            "cli.main(['synth', '--help']); print(os.environ.get('OMP_WAIT_POLICY'), before)")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "PASSIVE False"
