"""Process-level settings: the OpenMP wait policy the CLI asks for, without overriding the user."""

from __future__ import annotations

import os
import subprocess
import sys

from napari_whatishealthy.core.runtime import (
    BOUNDED_SPIN_COUNT,
    prefer_bounded_omp_spin,
    prefer_passive_omp_wait,
)


def test_passive_wait_is_set_only_when_the_user_chose_none():
    env: dict[str, str] = {}
    assert prefer_passive_omp_wait(env) and env["OMP_WAIT_POLICY"] == "PASSIVE"
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert not prefer_passive_omp_wait(env) and env["OMP_WAIT_POLICY"] == "ACTIVE"


def test_bounded_spin_is_set_only_when_the_user_chose_none_and_torch_is_not_loaded():
    env: dict[str, str] = {}
    assert prefer_bounded_omp_spin(env, torch_loaded=False)
    assert env == {"GOMP_SPINCOUNT": str(BOUNDED_SPIN_COUNT)}
    for chosen in ({"OMP_WAIT_POLICY": "PASSIVE"}, {"GOMP_SPINCOUNT": "0"}):
        env = dict(chosen)
        assert not prefer_bounded_omp_spin(env, torch_loaded=False) and env == chosen
    env = {}
    assert not prefer_bounded_omp_spin(env, torch_loaded=True) and env == {}  # too late: no-op
    # The CLI's PASSIVE does not override a spin count the user chose either.
    env = {"GOMP_SPINCOUNT": "5000"}
    assert not prefer_passive_omp_wait(env) and env == {"GOMP_SPINCOUNT": "5000"}


def test_the_cli_sets_it_before_torch_is_imported():
    code = ("import os, sys; from napari_whatishealthy import cli; before = 'torch' in sys.modules; "
            "cli.main(['synth', '--help']); print(os.environ.get('OMP_WAIT_POLICY'), before)")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "PASSIVE False"


def test_training_autocast_on_a_cpu_follows_its_bf16_support(monkeypatch):
    import torch

    from napari_whatishealthy.core import hardware
    from napari_whatishealthy.core.trainer import autocast

    cpu = torch.device("cpu")
    for flags, expected in ((("avx2", "avx512f"), False), (("avx512f", "avx512_bf16"), True)):
        monkeypatch.setattr(hardware, "cpu_info",
                            lambda flags=flags: hardware.CpuInfo("test", frozenset(flags), "AVX2", 2))
        with autocast(cpu, "auto"):
            assert torch.is_autocast_enabled("cpu") is expected, flags
        with autocast(cpu, "on"):
            assert torch.is_autocast_enabled("cpu")
        with autocast(cpu, "off"):
            assert not torch.is_autocast_enabled("cpu")
