"""Cohort runs split over processes: shards, --resume, torchrun localize and evaluate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from napari_whatishealthy.cli import main
from napari_whatishealthy.core.errors import WhatIsHealthyError
from napari_whatishealthy.core.sharding import current_shard, parse_shard


def test_shards_partition_the_cases_and_combine_with_torchrun():
    items = list(range(11))
    for n in (1, 2, 3, 5):
        parts = [current_shard((k, n), environ={}).take(items) for k in range(n)]
        assert sorted(x for part in parts for x in part) == items
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    # job 1 of 2, rank 1 of 3: shard 1 * 3 + 1 = 4 of 6
    shard = current_shard("1/2", environ={"WORLD_SIZE": "3", "RANK": "1", "LOCAL_RANK": "1"})
    assert (shard.index, shard.count, shard.rank, shard.is_main) == (4, 6, 1, False)
    assert current_shard(None, environ={}).take(items) == items
    for bad in ("2/2", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(WhatIsHealthyError, match="--shard"):
            parse_shard(bad)


def _localize(*args, capsys=None) -> int:
    return main(["localize", *map(str, args), "--steps", "1", "--device", "cpu",
                 "--no-progress"])


def _masks(folder: Path) -> dict[str, bytes]:
    """The bytes of every NIfTI output (masks, differences, healthy images) as written."""
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.nii.gz"))}


def test_two_shards_write_what_one_process_writes_and_resume_skips_done_cases(
        synthetic_cases, tiny_checkpoint, tmp_path, capsys):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    assert _localize(synthetic_cases, "--out", single, "--model", tiny_checkpoint) == 0
    for k in (0, 1):
        assert _localize(synthetic_cases, "--out", sharded, "--model", tiny_checkpoint,
                         "--shard", f"{k}/2") == 0
    out = capsys.readouterr().out
    assert "2 of 4 cases to run here (shard 1/2)" in out
    assert len(_masks(single)) == 12 and _masks(single) == _masks(sharded)

    # --resume: every case is done with this model and these settings: nothing is rewritten.
    before = {p.name: p.stat().st_mtime_ns for p in single.iterdir()}
    assert _localize(synthetic_cases, "--out", single, "--model", tiny_checkpoint,
                     "--resume") == 0
    assert "0 of 4 cases to run here; 4 already done (--resume)" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in single.iterdir()} == before

    # A case whose output changed, or a run with other settings, is not "done".
    mask = sorted(single.glob("*_mask.nii.gz"))[1]
    data = bytearray(mask.read_bytes())
    data[len(data) // 2] ^= 0xFF
    mask.write_bytes(bytes(data))
    assert _localize(synthetic_cases, "--out", single, "--model", tiny_checkpoint,
                     "--resume") == 2
    err = capsys.readouterr().err
    assert f"{mask.name} changed since it was written" in err and "--overwrite" in err
    assert _localize(synthetic_cases, "--out", single, "--model", tiny_checkpoint,
                     "--resume", "--overwrite") == 0
    assert "1 of 4 cases to run here; 3 already done" in capsys.readouterr().out
    assert _masks(single) == _masks(sharded)
    assert _localize(synthetic_cases, "--out", single, "--model", tiny_checkpoint,
                     "--resume", "--guidance", "1.5") == 2
    assert "other settings (guidance: 3.0 -> 1.5)" in capsys.readouterr().err


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "napari_whatishealthy", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_torchrun_localize_and_evaluate_match_one_process(synthetic_cases, tiny_checkpoint,
                                                           tmp_path, capsys):
    single = tmp_path / "single"
    assert _localize(synthetic_cases, "--out", single, "--model", tiny_checkpoint) == 0
    ranks = tmp_path / "ranks"
    proc = _torchrun("localize", str(synthetic_cases), "--out", str(ranks), "--model",
                     str(tiny_checkpoint), "--steps", "1", "--device", "cpu", "--no-progress")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 of 4 cases to run here (shard 0/2)" in proc.stdout
    assert "2 of 4 cases to run here (shard 1/2)" in proc.stdout
    assert len(_masks(ranks)) == 12 and _masks(ranks) == _masks(single)

    common = ["--model", str(tiny_checkpoint), "--steps", "1", "--device", "cpu",
              "--no-progress"]
    one = tmp_path / "one.json"
    assert main(["evaluate", str(synthetic_cases), "--json", str(one), *common]) == 0
    two = tmp_path / "two.json"
    proc = _torchrun("evaluate", str(synthetic_cases), "--json", str(two), *common)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("pooled") == capsys.readouterr().out.count("pooled")  # one table
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert [c["name"] for c in b["cases"]] == [c["name"] for c in a["cases"]]
    for x, y in zip(a["cases"], b["cases"], strict=True):
        x.pop("seconds", None), y.pop("seconds", None)
    assert a["cases"] == b["cases"] and a["pooled"] == b["pooled"]
