"""Slice labels, the slice dataset, a short real training run, resume, and 2-process DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_SIZE, tiny_network

from napari_whatishealthy.core.data import build_slice_set, discover_cases, slice_labels
from napari_whatishealthy.core.errors import WhatIsHealthyError
from napari_whatishealthy.core.model import HEALTHY, UNHEALTHY, load_checkpoint
from napari_whatishealthy.core.preprocess import prepare
from napari_whatishealthy.core.train import (
    BalancedSampler,
    TrainConfig,
    read_log,
    train,
)
from napari_whatishealthy.core.volume import load_volume

MODALITIES = ("flair", "t1", "t1ce", "t2")


def test_slice_labels_from_segmentation():
    seg = np.zeros((5, 5, 8), np.int16)
    seg[1, 2, 2] = 2
    seg[3, 3, 5] = 4
    seg[0, 0, 6] = 1
    labels = slice_labels(seg, np.array([0, 2, 3, 5, 6, 7]))
    assert labels.tolist() == [HEALTHY, UNHEALTHY, HEALTHY, UNHEALTHY, UNHEALTHY, HEALTHY]


def test_slice_set_labels_match_the_segmentations(synthetic_cases, case_dirs, tmp_path):
    assert discover_cases(synthetic_cases) == case_dirs
    assert discover_cases(case_dirs[0]) == [case_dirs[0]]
    with pytest.raises(WhatIsHealthyError, match="no BraTS-layout case folders"):
        discover_cases(tmp_path)
    ss = build_slice_set(case_dirs, MODALITIES, TINY_SIZE)
    assert ss.slices.shape[1:] == (4, TINY_SIZE, TINY_SIZE)
    assert ss.slices.dtype == np.float16
    start = 0
    for i, case in enumerate(case_dirs):
        vol = load_volume(case)
        prepared = prepare(vol.data, TINY_SIZE)
        n = len(prepared.slice_index)
        assert np.all(ss.case_of_slice[start:start + n] == i)
        expected = [(vol.segmentation[..., z] > 0).any() for z in prepared.slice_index]
        assert ss.labels[start:start + n].tolist() == [int(e) for e in expected]
        start += n
    assert start == len(ss)
    counts = ss.counts()
    assert counts["healthy"] > 0 and counts["unhealthy"] > 0


def test_balanced_sampler():
    labels = np.array([HEALTHY] * 90 + [UNHEALTHY] * 10)
    sampler = BalancedSampler(labels, seed=0)
    batch = sampler.sample(64)
    assert (labels[batch] == UNHEALTHY).sum() == 32
    with pytest.raises(WhatIsHealthyError, match="both healthy and unhealthy"):
        BalancedSampler(np.zeros(5, np.int64), seed=0)


def _config(data: Path, out: Path, **kw) -> TrainConfig:
    values = dict(
        data=str(data), out=str(out), size=TINY_SIZE, modalities=MODALITIES, steps=30, batch=8,
        lr=3e-3, warmup=3, log_every=5, val_every=15, checkpoint_every=10, network=tiny_network(),
        seed=0, amp="off",
    )
    values.update(kw)
    return TrainConfig(**values)


def test_short_training_lowers_the_loss_and_resumes(synthetic_cases, tmp_path):
    out = tmp_path / "run"
    logs: list[str] = []
    ckpt = train(_config(synthetic_cases, out), log=logs.append, show_progress=False)
    records = read_log(out)
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    assert all(np.isfinite(r["loss"]) for r in records)
    assert records[-1]["loss"] < 0.8 * records[0]["loss"], records
    assert "val_loss" in records[2] and np.isfinite(records[-1]["val_loss"])
    model = load_checkpoint(ckpt)  # loadable, and it says how it was trained
    assert model.spec.training["steps"] == 30
    assert model.spec.image_size == TINY_SIZE
    assert (out / "slice_store" / "index.json").exists()

    with pytest.raises(WhatIsHealthyError, match="--resume"):
        train(_config(synthetic_cases, out), log=logs.append, show_progress=False)

    logs.clear()
    train(_config(synthetic_cases, out, steps=40, resume=True), log=logs.append,
          show_progress=False)
    assert any("resumed at step 30" in line for line in logs)
    records = read_log(out)
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30, 35, 40]
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["step"] == 40
    assert load_checkpoint(ckpt).spec.training["steps"] == 40


@pytest.mark.slow
def test_two_process_ddp_run(synthetic_cases, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "napari_whatishealthy.cli", "train", str(synthetic_cases), "--out", str(out),
        "--size", str(TINY_SIZE), "--steps", "4", "--batch", "4", "--channels", "8,16",
        "--attention", "0,1", "--log-every", "2", "--val-every", "4", "--checkpoint-every", "4",
        "--device", "cpu", "--amp", "off", "--no-progress",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Only rank 0 writes: one log line per interval, not two.
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    spec = load_checkpoint(out / "checkpoint").spec
    assert spec.training["world_size"] == 2
    assert spec.training["batch"] == 8
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint", "slice_store", "train_log.jsonl", "train_state.pt",
    ]
    assert "world size 2" in proc.stdout + proc.stderr
