"""Progress: a live bar in a terminal, one line per case (or training log interval) in a log."""

from __future__ import annotations

import io
import sys

from napari_whatishealthy import cli
from napari_whatishealthy.core.counterfactual import Progress
from napari_whatishealthy.core.progress import (
    SilentBar,
    interval_line,
    is_live,
    is_terminal,
    progress_bar,
)


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_draws_only_in_a_terminal():
    log = io.StringIO()
    bar = progress_bar(10, desc="case", file=log)
    assert isinstance(bar, SilentBar) and not is_live(bar)
    for _ in range(10):
        bar.update(1)
    bar.close()
    assert bar.n == 10 and log.getvalue() == ""

    terminal = FakeTerminal()
    bar = progress_bar(10, desc="case", file=terminal)
    assert is_live(bar)
    bar.update(5)
    bar.close()
    assert "\r" in terminal.getvalue() and "case" in terminal.getvalue()
    assert not is_terminal(io.StringIO()) and is_terminal(terminal)


def test_localize_bar_is_unchanged_in_a_terminal(monkeypatch):
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    bar = cli._Bar("case_1", True)
    for step in range(1, 4):
        bar(Progress(step, 3, "invert"))
    bar.close()
    assert "\r" in terminal.getvalue() and "case_1" in terminal.getvalue()


def test_localize_in_a_log_writes_one_line_per_case_and_no_carriage_returns(
        capsys, tiny_checkpoint, synthetic_cases, case_dirs, tmp_path):
    rc = cli.main(["localize", str(synthetic_cases), "--out", str(tmp_path / "out"), "--model",
                   str(tiny_checkpoint), "--steps", "2"])  # progress on, but stderr is no terminal
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "\r" not in captured.err and "\r" not in captured.out
    lines = captured.out.strip().splitlines()
    assert len(lines) == len(case_dirs)
    assert sorted(line.split(":")[0] for line in lines) == sorted(c.name for c in case_dirs)


def test_training_in_a_log_writes_one_line_per_log_interval(capsys, synthetic_cases, tmp_path):
    rc = cli.main(["train", str(synthetic_cases), "--out", str(tmp_path / "run"), "--size", "16",
                   "--steps", "4", "--batch", "4", "--channels", "8,16", "--attention", "0,1",
                   "--log-every", "2", "--amp", "off"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "\r" not in captured.err and "\r" not in captured.out
    steps = [line for line in captured.out.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in steps] == ["step 2/4", "step 4/4"]
    assert "loss" in steps[0] and "slices/s" in steps[0]


def test_interval_line_names_what_was_measured():
    line = interval_line({"step": 50, "loss": 0.04123, "val_loss": 0.0391, "lr": 1e-4,
                          "slices_per_s": 812.4, "elapsed_s": 61.04}, 1000)
    assert line == "step 50/1000: loss 0.04123, val_loss 0.0391, 812 slices/s, 61.0 s"
