"""Data-loss trials for issue 17: concurrent `localize` runs into one folder, and `--overwrite`
runs interrupted by SIGINT / SIGTERM. Prints one table row per trial and a summary.

A trial loses data when, afterwards, the folder's provenance lists an output that is missing or
whose SHA-256 differs from the one recorded (a mixed or broken set), a run that exited 0 has no
set, a temporary file or lock is left, or a run printed a traceback.

    python scripts/write_safety_trials.py [--concurrent 20] [--interrupted 10] [--seed 0]

Uses a tiny random model (the test suite's) and one synthetic case at 6 mm, in a temporary
folder; nothing else is touched.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def _fixtures(base: Path) -> tuple[Path, Path]:
    import torch

    from napari_whatishealthy.core.model import ModelSpec, NetworkSpec, build_model, save_checkpoint
    from napari_whatishealthy.core.synthetic import synthesise

    torch.manual_seed(0)
    spec = ModelSpec(image_size=16, name="tiny-trials",
                     network=NetworkSpec(channels=(8, 16), attention_levels=(False, True),
                                         norm_num_groups=8, num_head_channels=8,
                                         label_embedding_dim=8))
    spec.inference.steps = 2
    spec.inference.noise_level = 0.2
    model = build_model(spec)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    checkpoint = save_checkpoint(model, base / "model")
    synthesise(base / "cases", 1, seed=3, voxel_size=6.0, healthy_fraction=0.0)
    case = next(p for p in (base / "cases").iterdir() if p.is_dir())
    return checkpoint, case


def _default_sigint() -> None:
    """In the child: SIGINT as in a terminal (a shell starts background jobs with SIGINT
    ignored, and Python then never raises KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _command(case: Path, model: Path, out: Path, seed: int, overwrite: bool) -> list[str]:
    cmd = [sys.executable, "-m", "napari_whatishealthy.cli", "localize", str(case), "--out", str(out),
           "--model", str(model), "--no-progress", "--seed", str(seed)]
    return cmd + (["--overwrite"] if overwrite else [])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check(out: Path, case: str) -> str:
    """'' when the folder holds one whole set (or nothing), else what is wrong."""
    leftovers = [p.name for p in out.iterdir() if ".wih-" in p.name or p.name.endswith(".lock")]
    if leftovers:
        return f"left {leftovers}"
    prov = out / f"{case}_provenance.json"
    if not prov.exists():
        others = [p.name for p in out.iterdir()]
        return f"no provenance beside {others}" if others else ""
    record = json.loads(prov.read_text())
    for key, digest in record["output_sha256"].items():
        path = Path(record["outputs"][key])
        if not path.exists():
            return f"{path.name} missing"
        if _sha(path) != digest:
            return f"{path.name} is not the file the provenance describes"
    return ""


def _set_seed(out: Path, case: str) -> int | None:
    prov = out / f"{case}_provenance.json"
    if not prov.exists():
        return None
    return json.loads(prov.read_text()).get("settings", {}).get("seed")


def concurrent_trial(i: int, base: Path, case: Path, model: Path) -> dict:
    out = base / f"concurrent-{i}"
    overwrite = i % 2 == 1
    if overwrite:  # a previous set to replace
        subprocess.run(_command(case, model, out, 99, False), env=_env(), check=True,
                       capture_output=True)
    procs = [subprocess.Popen(_command(case, model, out, seed, overwrite), env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (1, 2)]
    results = [p.communicate(timeout=600) for p in procs]
    codes = [p.returncode for p in procs]
    problem = _check(out, case.name)
    if any("Traceback" in err for _, err in results):
        problem = problem or "traceback"
    if 0 in codes and not (out / f"{case.name}_provenance.json").exists():
        problem = problem or "a run reported success and its set is gone"
    if not overwrite and sorted(codes) != [0, 2]:
        problem = problem or f"exit codes {codes}: one run should win, the other refuse"
    return {"trial": f"concurrent {i + 1}", "mode": "--overwrite" if overwrite else "new folder",
            "exits": "/".join(map(str, codes)), "set seed": _set_seed(out, case.name),
            "loss": bool(problem), "note": problem}


def interrupted_trial(i: int, base: Path, case: Path, model: Path, duration: float,
                      rng: random.Random) -> dict:
    out = base / f"interrupted-{i}"
    t0 = time.monotonic()
    subprocess.run(_command(case, model, out, 99, False), env=_env(), check=True,
                   capture_output=True)
    duration = time.monotonic() - t0  # the machine's speed now (it is shared)
    sig = signal.SIGTERM if i % 2 == 0 else signal.SIGINT
    on_temp = i < 5  # half the trials strike the moment the first new file is being written
    proc = subprocess.Popen(_command(case, model, out, 7, True), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    started = time.monotonic()
    deadline = started + (duration * 3 if on_temp else rng.uniform(0.3, 0.95) * duration)
    phase = "finished first"
    while proc.poll() is None and time.monotonic() < deadline:
        if on_temp and any(".wih-tmp" in p.name for p in out.iterdir()):
            phase = "writing"
            break
        time.sleep(0.002)
    if proc.poll() is None:
        phase = phase if phase == "writing" else f"at {time.monotonic() - started:.1f} s"
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=600)
    problem = _check(out, case.name)
    if "Traceback" in err:
        problem = problem or "traceback"
    seed = _set_seed(out, case.name)
    expected = {signal.SIGTERM: 143, signal.SIGINT: 130}[sig]
    note = ""
    if proc.returncode not in (0, expected):  # killed outright, before or after the handler
        note = f"(killed by the default action: {proc.returncode})"
    return {"trial": f"interrupted {i + 1}", "mode": f"{sig.name} {phase}",
            "exits": str(proc.returncode), "set seed": seed,
            "loss": bool(problem) or seed not in (99, 7), "note": problem or note}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrent", type=int, default=20)
    parser.add_argument("--interrupted", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="wih-trials-") as tmp:
        base = Path(tmp)
        model, case = _fixtures(base)
        t0 = time.monotonic()
        subprocess.run(_command(case, model, base / "timing", 0, False), env=_env(), check=True,
                       capture_output=True)
        duration = time.monotonic() - t0
        print(f"one uninterrupted run: {duration:.1f} s (process start included)", flush=True)
        for i in range(args.concurrent):
            rows.append(concurrent_trial(i, base, case, model))
            print(_row(rows[-1]), flush=True)
        for i in range(args.interrupted):
            rows.append(interrupted_trial(i, base, case, model, duration, rng))
            print(_row(rows[-1]), flush=True)
    print()
    print(f"{'trials':<28}{'runs':>6}{'data loss':>11}")
    for kind in ("concurrent", "interrupted"):
        part = [r for r in rows if r["trial"].startswith(kind)]
        print(f"{kind:<28}{len(part):>6}{sum(r['loss'] for r in part):>11}")
    print("(set seed: whose set the folder holds afterwards: 99 the previous run, 1/2 or 7 the "
          "new runs)")
    return 1 if any(r["loss"] for r in rows) else 0


def _row(r: dict) -> str:
    verdict = "LOSS " + r["note"] if r["loss"] else ("ok " + r["note"]).strip()
    return (f"{r['trial']:<16} {r['mode']:<22} exits {r['exits']:<8} set seed "
            f"{str(r['set seed']):<5} {verdict}")


if __name__ == "__main__":
    sys.exit(main())
