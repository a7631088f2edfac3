"""Smoke tests: every benchmark script runs with its tiniest settings and prints its table.

Timings are never asserted; what is checked is that each script still works end to end and that
its output has the promised shape (the table, the comparison against its reference in the same
run, the last line).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
pytestmark = pytest.mark.slow


def _run(*args: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _table_rows(text: str) -> list[list[str]]:
    rows = [line.strip().strip("|").split("|") for line in text.splitlines()
            if line.startswith("|") and not line.startswith("|--") and not line.startswith("|-")]
    return [[cell.strip() for cell in row] for row in rows[1:]]  # without the header


def test_speed_tiny_compares_against_the_reference():
    out = _run(BENCHMARKS / "speed.py", "--tiny")
    rows = _table_rows(out)
    assert [r[0] for r in rows] == ["reference code's structure, batch 32",
                                    "naive loop, 1 slice per call (extrapolated)", "pipeline"]
    for row in rows:
        assert float(row[2]) > 0 and int(row[3]) > 0 and float(row[4]) > 0
    assert rows[0][5] == "1.00x"  # the batch-32 reference is what the speedups are against
    assert re.search(r"^cpu: .*torch CPU capability", out, re.M)
    assert re.search(r"^pipeline on this cpu: (torch, (float32|bfloat16 autocast)|openvino, "
                     r"(bf16|float32)), \d+ slices", out, re.M)
    assert "75+75 steps" in out
    assert "outputs agree: yes" in out
    assert re.search(r"threshold slider .*: [\d.]+ ms median", out)
    assert re.search(r"the widget's OpenMP policy \(napari's process: OMP_WAIT_POLICY=\w+, "
                     r"GOMP_SPINCOUNT=\w+\): [\d.]+ s \(median of \d; load average", out)
    assert re.fullmatch(r"speedup_vs_reference \d+\.\d\d", out.strip().splitlines()[-1])


def test_speed_ablation_tiny_lists_each_measure():
    out = _run(BENCHMARKS / "speed.py", "--ablation", "--tiny")
    rows = _table_rows(out)
    assert rows[0][0].startswith("reference code: float32, 32 slices") and rows[0][2] == "1.00x"
    assert rows[1][0].startswith("naive loop")
    assert any("channels-last" in r[0] for r in rows) and len(rows) == 7
    assert rows[-1][0].startswith("+ inference copy")
    assert all(float(r[1]) > 0 for r in rows)


def test_quality_tiny_has_every_method_and_baseline():
    full = _run(BENCHMARKS / "quality.py", "--tiny", "--z-stride", "2")
    out, *beside = full.split("\n### ")  # the summary table, then one baseline table per run
    methods = {r[0] for r in _table_rows(out)}
    assert len(beside) == len(methods) - 1  # every run but the baseline itself
    assert all("FLAIR Dice (best threshold)" in b for b in beside)
    assert {"unguided reconstruction (w=0)", "FLAIR intensity"} <= methods
    assert any(m.startswith("counterfactual (w=") for m in methods)
    assert any(m.startswith("classifier guidance (s=") for m in methods)
    assert "every 2th brain slice" in out
    for row in _table_rows(out):
        assert 0.0 <= float(row[3]) <= 1.0 and 0.0 <= float(row[4]) <= 1.0  # AUROC, AUPRC


def test_tune_on_tiny_cases(tiny_checkpoint, synthetic_cases):
    out = _run(BENCHMARKS / "tune.py", tiny_checkpoint, synthetic_cases, "--grid", "0.2:1",
               "0.2:3", "--steps", "2", "--z-stride", "2")
    rows = _table_rows(out)
    assert [(float(r[0]), float(r[1])) for r in rows[:2]] == [(0.2, 1.0), (0.2, 3.0)]
    assert all(0.0 <= float(r[4]) <= 1.0 for r in rows[:2])  # AUPRC


def test_gpu_check_quick_on_cpu_prints_every_row():
    """The GPU check the lead runs on a lent GPU: its CPU smoke mode goes through every row."""
    env = dict(os.environ, DEVICE="cpu", QUICK="1", COMPILE="0", BUDGET="600",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh")], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _table_rows(proc.stdout)
    names = [r[0] for r in rows]
    assert names[0].startswith("pipeline") and "reference, batch 32, float32" in names
    assert any(n.startswith("naive loop") for n in names)
    assert any("75+75 steps" in n for n in names)
    reference = next(r for r in rows if r[0] == "reference, batch 32, float32")
    assert reference[3] == "1.00x" and float(reference[2]) > 0
    # The split by stage of the pipeline, the preview and (the smoke test maps the outputs back
    # with torch on the CPU, as CUDA does) the same run with the numpy outputs beside it.
    split = re.compile(r"preparing \d+\.\d+ s, network \d+\.\d+ s, outputs \d+\.\d+ s \(on (\w+)\), "
                       r"mask \d+\.\d+ s, other \d+\.\d+ s")
    assert split.match(rows[0][4]).group(1) == "cpu"
    preview = next(r for r in rows if r[0].startswith("one-slice preview"))
    assert preview[1] == "1" and preview[3] == "-" and split.match(preview[4])
    host = next(r for r in rows if "on the host" in r[0])
    assert split.match(host[4]).group(1) == "host"
    assert re.fullmatch(r"gpu_speedup_vs_reference \d+\.\d\d", proc.stdout.strip().splitlines()[-1])


def test_synth_slices_equal_the_slices_train_makes_from_the_synth_files(tmp_path):
    """benchmarks/synth_slices.py skips the NIfTI files; its slices must be those files' slices."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import synth_slices
    finally:
        sys.path.remove(str(BENCHMARKS))
    from napari_whatishealthy.core.data import build_slice_set, discover_cases, load_slice_set
    from napari_whatishealthy.core.synthetic import synthesise

    models = {"default": ("flair", "t1", "t1ce", "t2"), "flair": ("flair",)}
    n = synth_slices.build(tmp_path / "work", 2, seed=7, workers=1, seconds=300, models=models,
                           size=16, voxel_size=6.0)
    assert n == 2
    synthesise(tmp_path / "files", 2, seed=7, voxel_size=6.0)
    for name, modalities in models.items():
        fast = load_slice_set(tmp_path / "work" / name / "slices.npz")
        ref = build_slice_set(discover_cases(tmp_path / "files"), modalities, 16)
        assert fast.cases == ref.cases
        assert np.array_equal(fast.labels, ref.labels) and (fast.labels == 1).any()
        assert np.array_equal(fast.slices, ref.slices)


def test_gpu_scale_quick_on_cpu_prints_every_row():
    env = dict(os.environ, DEVICE="cpu", QUICK="1", BUDGET="600", OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(BENCHMARKS / "gpu_scale.sh")], capture_output=True,
                          text=True, env=dict(env, PYTHON=sys.executable), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _table_rows(proc.stdout)
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("16", "8", "store, streamed per batch"), ("16", "16", "store, streamed per batch"),
        ("32", "8", "store, streamed per batch"), ("32", "16", "store, streamed per batch"),
        ("16", "16", "store, streamed per batch")]
    assert all(float(r[3]) > 0 for r in rows)
    assert "streamed / default steps/s at 16 px, batch 16:" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith("gpu_scale_rows [")


@pytest.mark.gui
def test_review_tiny_prints_the_table_with_its_reference():
    out = _run(BENCHMARKS / "review.py", "--tiny")
    lines = out.splitlines()
    rows = {line[:58].strip(): line[58:].split() for line in lines
            if line[:58].strip().startswith(("first run", "second run", "threshold", "reference"))}
    assert "reference: core threshold_region alone (median)" in rows
    assert "threshold update incl. redraw (median)" in rows
    assert rows["threshold update (median of moves)"][1] == "30"  # the target is printed
    assert all(float(values[0]) > 0 for values in rows.values())


def test_independent_cases_then_score_options_beside_the_flair_baseline(tiny_checkpoint, tmp_path):
    """The issue-12 study: cases from the independent lesion model (BraTS layout, half stored
    flipped), then every scoring option and the FLAIR baseline on them."""
    from napari_whatishealthy.core.volume import load_volume

    cases = tmp_path / "indep"
    _run(BENCHMARKS / "independent_cases.py", cases, "--cases", "12", "--seed", "1",
         "--voxel-size", "4")
    kinds = {c["name"]: c["kind"] for c in json.loads((cases / "cases.json").read_text())["cases"]}
    assert sorted(kinds.values()).count("typical") == 6 and list(kinds.values()).count("healthy") == 3
    first, second = (load_volume(cases / name) for name in sorted(kinds)[:2])
    assert first.segmentation.any() and second.segmentation.any()  # typical: lesions painted
    out = _run(BENCHMARKS / "score_options.py", cases, "--model", tiny_checkpoint, "--z-stride",
               "3", "--noise-levels", "0.2", "--guidance-values", "8", "--no-inversion-normalisation",
               "--steps-values", "3", "--cache", tmp_path / "cache")
    rows = _table_rows(out)
    options = {r[0] for r in rows}
    assert {"default", "erode 4", "guided r4 e-3", "w=8, guided r8", "FLAIR baseline",
            "steps=3", "steps=3, guided r8", "lesion contrast expected, guided r8"} <= options
    assert {r[1].split(" ")[0] for r in rows} == {"all", "typical", "subtle"}
    assert all(0.0 <= float(r[2]) <= 1.0 for r in rows)  # AUPRC
    assert "best-Dice thresholds on these cases" in out


def test_independent_cases_mix_of_kinds():
    import importlib.util

    spec = importlib.util.spec_from_file_location("independent_cases",
                                                  BENCHMARKS / "independent_cases.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module._kinds("moderate:2,healthy:1", 5) == ["moderate", "moderate", "healthy",
                                                         "moderate", "moderate"]
    default = module._kinds(module.DEFAULT_MIX, 12)
    assert default.count("typical") == 6 and default.count("subtle") == 3
    for bad in ("huge:2", "typical", "typical:x"):
        with pytest.raises(SystemExit, match="--mix"):
            module._kinds(bad, 4)


def test_speed_measures_tiny_compares_each_measure_with_identical_outputs():
    out = _run(BENCHMARKS / "speed_measures.py", "--tiny", "--rounds", "1")
    rows = _table_rows(out)
    names = [r[0] for r in rows]
    assert names.count("network forward: model -> inference copy") == 4
    assert any(n.startswith("counterfactual: model + sort") for n in names)
    assert any(n.startswith("model-space slices") for n in names)
    assert any(n.startswith("volume outputs on the CPU") for n in names)
    for row in rows:
        assert float(row[2]) >= 0 and float(row[3]) >= 0 and row[4].endswith("x")
        # Every measure but the torch outputs path is exact; that one is within float rounding.
        assert float(row[5]) <= (1e-4 if row[0].startswith("volume outputs") else 0.0), row
