"""Classifier guidance: the noisy-image classifier, its checkpoints, the guided decoding path,
the pipeline and the command line, on tiny networks and tiny data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_SIZE, tiny_spec

from napari_whatishealthy import cli
from napari_whatishealthy.core.classifier import (
    ClassifierNetworkSpec,
    ClassifierSpec,
    build_classifier,
    check_compatible,
    classifier_gradient,
    load_classifier,
    load_classifier_spec,
    log_prob,
    resolve_classifier,
    save_classifier,
    target_class,
)
from napari_whatishealthy.core.counterfactual import (
    CounterfactualSettings,
    counterfactual,
    decode,
    timestep_plan,
)
from napari_whatishealthy.core.errors import WhatIsHealthyError
from napari_whatishealthy.core.model import (
    HEALTHY,
    NULL,
    UNHEALTHY,
    CheckpointError,
    ModelSpec,
    ScheduleSpec,
    build_model,
    load_checkpoint,
)
from napari_whatishealthy.core.pipeline import LocalizeSettings, localize
from napari_whatishealthy.core.registry import load_model_cached
from napari_whatishealthy.core.train import BalancedSampler
from napari_whatishealthy.core.train_classifier import classifier_loss
from napari_whatishealthy.core.volume import load_volume

torch.set_num_threads(1)

SCHEDULE = ScheduleSpec()
ALPHAS = SCHEDULE.alphas_cumprod()


def tiny_classifier_spec(channels: int = 4, **changes) -> ClassifierSpec:
    modalities = ("flair", "t1", "t1ce", "t2")[:channels]
    spec = ClassifierSpec(
        image_size=TINY_SIZE, modalities=modalities, name="tiny-classifier",
        network=ClassifierNetworkSpec(channels=(8, 16), attention_levels=(False, True),
                                      norm_num_groups=8, num_head_channels=8),
    )
    for key, value in changes.items():
        setattr(spec, key, value)
    return spec


def toy_batch(n: int, gen: torch.Generator, channels: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Trivially separable: healthy images are dark (-0.5), unhealthy ones bright (+0.5)."""
    labels = torch.arange(n) % 2  # HEALTHY = 0, UNHEALTHY = 1
    level = torch.where(labels == UNHEALTHY, 0.5, -0.5).view(-1, 1, 1, 1)
    x = level + 0.1 * torch.randn(n, channels, TINY_SIZE, TINY_SIZE, generator=gen)
    return x, labels


@pytest.fixture(scope="module")
def toy_classifier():
    """A tiny classifier trained for 40 steps on the toy set at low noise levels."""
    torch.manual_seed(0)
    spec = tiny_classifier_spec(channels=2, max_timestep=300)
    model = build_classifier(spec)
    timesteps = spec.trained_timesteps()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(40):
        x0, labels = toy_batch(16, gen)
        loss, _, _ = classifier_loss(model, x0, labels, ALPHAS.float(), timesteps, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class LinearClassifier(torch.nn.Module):
    """logits_k = <w_k, x>: grad_x log p(k) = w_k - sum_j p_j w_j, in closed form."""

    def __init__(self, shape: tuple[int, ...], seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(0.05 * torch.randn(2, *shape, generator=g),
                                    requires_grad=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bchw,kchw->bk", x, self.w)

    def analytic_grad(self, x: torch.Tensor, k: int) -> torch.Tensor:
        p = torch.softmax(self(x, None), dim=1)
        return self.w[k] - torch.einsum("bk,kchw->bchw", p, self.w)


class GaussianEps:
    """The exact noise predictor for x0 ~ N(0, s^2), whatever the label."""

    def __init__(self, s: float = 0.5) -> None:
        self.s = s
        self.labels: list[list[int]] = []

    def __call__(self, x, t, labels):
        self.labels.append(labels.tolist())
        a = ALPHAS[t.cpu()].view(-1, 1, 1, 1)
        c = torch.sqrt(1 - a) / (a * self.s**2 + 1 - a)
        return (c * x.double()).float()


def plain(**kw) -> CounterfactualSettings:
    base = dict(guidance=0.0, dynamic_normalisation=False, amp=False, device="cpu", steps=3,
                noise_level=0.3)
    base.update(kw)
    return CounterfactualSettings(**base)


# ------------------------------------------------------------------------------- the gradient


def test_gradient_matches_the_closed_form() -> None:
    clf = LinearClassifier((2, 8, 8))
    x = torch.randn(3, 2, 8, 8)
    for k in (HEALTHY, UNHEALTHY):
        torch.testing.assert_close(classifier_gradient(clf, x, 100, k), clf.analytic_grad(x, k),
                                   rtol=1e-5, atol=1e-6)
    # An inference tensor (what decoding holds) is accepted, and grad mode does not leak out.
    with torch.inference_mode():
        xi = x * 1.0
    with torch.no_grad():
        g = classifier_gradient(clf, xi, 100, HEALTHY)
        assert not torch.is_grad_enabled()
    assert not g.requires_grad
    torch.testing.assert_close(g, clf.analytic_grad(x, HEALTHY), rtol=1e-5, atol=1e-6)


def test_the_toy_classifier_separates_and_its_gradient_pushes_toward_healthy(toy_classifier):
    gen = torch.Generator().manual_seed(1)
    x, labels = toy_batch(8, gen)
    t = torch.zeros(8, dtype=torch.long)
    with torch.no_grad():
        acc = (toy_classifier(x, t).argmax(1) == labels).float().mean()
    assert acc == 1.0
    # Gradient ascent on log p(healthy | x_t, t) from unhealthy (bright) inputs.
    x = x[labels == UNHEALTHY]
    start = log_prob(toy_classifier, x, 50, HEALTHY)
    before = start.clone()
    for _ in range(5):
        x = x + 0.05 * classifier_gradient(toy_classifier, x, 50, HEALTHY).sign()
        after = log_prob(toy_classifier, x, 50, HEALTHY)
        assert (after > before).all()
        before = after
    assert (after - start).min() > 0.5
    assert x.mean() < 0.5  # the images got darker: toward the healthy class


# ------------------------------------------------------------------------- guided decoding


def test_scale_zero_equals_unguided_decoding_exactly() -> None:
    torch.manual_seed(0)
    model = build_model(tiny_spec()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
        model.label_embedding.weight[model.null_label].zero_()
    clf = build_classifier(tiny_classifier_spec()).eval()
    x = np.random.default_rng(0).uniform(-1, 1, (3, 4, TINY_SIZE, TINY_SIZE)).astype(np.float32)
    for dyn in (True, False):
        kw = dict(steps=2, noise_level=0.2, amp=False, device="cpu", dynamic_normalisation=dyn)
        implicit = counterfactual(model, x, CounterfactualSettings.from_spec(
            model.spec, guidance=0.0, **kw))
        guided = counterfactual(model, x, CounterfactualSettings.from_spec(
            model.spec, method="classifier", classifier=clf, classifier_scale=0.0, **kw))
        assert np.array_equal(guided, implicit)
        pushed = counterfactual(model, x, CounterfactualSettings.from_spec(
            model.spec, method="classifier", classifier=clf, classifier_scale=50.0, **kw))
        assert not np.allclose(pushed, implicit, atol=1e-4)
    # The default (implicit) path is untouched by the new fields.
    default = CounterfactualSettings.from_spec(model.spec, amp=False, device="cpu")
    assert default.method == "implicit" and default.classifier is None


def test_one_guided_step_is_eps_minus_sqrt_one_minus_alpha_bar_times_s_times_grad() -> None:
    clf = LinearClassifier((2, 8, 8), seed=3)
    x = torch.randn(2, 2, 8, 8)
    t, s = 300, 7.0
    pred = GaussianEps()
    out = decode(pred, x, [t], ALPHAS, guidance=0.0, dynamic_normalisation=False,
                 classifier=clf, classifier_scale=s, classifier_class=HEALTHY)
    a = float(ALPHAS[t])
    eps = pred(x, torch.full((2,), t), torch.full((2,), NULL)) \
        - math.sqrt(1 - a) * s * clf.analytic_grad(x, HEALTHY)
    expected = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)  # one step to the clean image
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # Only the null label is asked of the diffusion model: no second pass.
    assert all(set(labels) == {NULL} for labels in pred.labels)


def test_guided_counterfactual_is_more_healthy_for_the_classifier(toy_classifier):
    gen = torch.Generator().manual_seed(2)
    x, labels = toy_batch(8, gen)
    x = x[labels == UNHEALTHY].numpy()
    recon = counterfactual(GaussianEps(), x, plain(), schedule=SCHEDULE)
    guided = counterfactual(
        GaussianEps(), x, plain(method="classifier", classifier=toy_classifier,
                                classifier_scale=20.0),
        schedule=SCHEDULE,
    )
    t0 = torch.zeros(len(x), dtype=torch.long)
    lp_recon = log_prob(toy_classifier, torch.from_numpy(recon), t0, HEALTHY)
    lp_guided = log_prob(toy_classifier, torch.from_numpy(guided), t0, HEALTHY)
    assert (lp_guided > lp_recon).all()
    assert guided.mean() < recon.mean()


def test_classifier_settings_are_checked() -> None:
    x = np.zeros((1, 2, 8, 8), np.float32)
    with pytest.raises(WhatIsHealthyError, match="needs a noisy-image classifier"):
        counterfactual(GaussianEps(), x, plain(method="classifier"), schedule=SCHEDULE)
    with pytest.raises(WhatIsHealthyError, match="method must be one of"):
        counterfactual(GaussianEps(), x, plain(method="explicit"), schedule=SCHEDULE)
    with pytest.raises(WhatIsHealthyError, match="classifier_scale"):
        plain(method="classifier", classifier_scale=float("nan")).validate()
    with pytest.raises(WhatIsHealthyError, match="method"):
        LocalizeSettings.from_spec(tiny_spec(), method="cfg")


def test_compatibility_checks() -> None:
    model_spec = tiny_spec()
    check_compatible(tiny_classifier_spec(), model_spec, [20, 40])
    with pytest.raises(WhatIsHealthyError, match="works at 32x32"):
        check_compatible(tiny_classifier_spec(image_size=32), model_spec)
    with pytest.raises(WhatIsHealthyError, match="channels"):
        check_compatible(tiny_classifier_spec(channels=2), model_spec)
    other = tiny_classifier_spec()
    other.schedule.beta_end = 0.03
    with pytest.raises(WhatIsHealthyError, match="noise schedule"):
        check_compatible(other, model_spec)
    with pytest.raises(WhatIsHealthyError, match="not trained at timestep"):
        check_compatible(tiny_classifier_spec(max_timestep=100), model_spec, [100, 200])
    coarse = tiny_classifier_spec()
    coarse.schedule.timestep_stride = 20
    with pytest.raises(WhatIsHealthyError, match="not trained at timestep"):
        check_compatible(coarse, model_spec, [10, 20])
    assert target_class(tiny_classifier_spec(), model_spec, model_spec.labels["healthy"]) == HEALTHY
    # ... and at call time, through the driver.
    model = build_model(model_spec).eval()
    wrong = build_classifier(tiny_classifier_spec(max_timestep=10)).eval()
    cf = CounterfactualSettings.from_spec(model_spec, method="classifier", classifier=wrong,
                                          device="cpu")
    with pytest.raises(WhatIsHealthyError, match="not trained at timestep"):
        counterfactual(model, np.zeros((1, 4, TINY_SIZE, TINY_SIZE), np.float32), cf)
    assert timestep_plan(model_spec.schedule, 0.2, 2) == [100, 200]


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    clf = build_classifier(tiny_classifier_spec(max_timestep=500)).eval()
    folder = save_classifier(clf, tmp_path / "clf")
    data = json.loads((folder / "spec.json").read_text())
    assert data["format"] == "napari-whatishealthy/classifier-spec/1"
    loaded = load_classifier(folder)
    assert loaded.spec == clf.spec and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    x, t = torch.randn(2, 4, TINY_SIZE, TINY_SIZE), torch.tensor([0, 500])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t), clf(x, t))
    assert load_classifier_spec(folder).max_timestep == 500
    # The folder, one of its files, or the train-classifier output folder all resolve.
    assert resolve_classifier(folder / "spec.json") == folder.resolve()
    (tmp_path / "run").mkdir()
    save_classifier(clf, tmp_path / "run" / "checkpoint")
    assert resolve_classifier(tmp_path / "run") == (tmp_path / "run" / "checkpoint").resolve()


def test_checkpoint_refusals(tmp_path, tiny_checkpoint) -> None:
    clf = build_classifier(tiny_classifier_spec())
    folder = save_classifier(clf, tmp_path / "clf")
    # A pickle in place of the safetensors file is refused without being unpickled.
    bad = tmp_path / "pickled"
    bad.mkdir()
    (bad / "spec.json").write_text((folder / "spec.json").read_text())
    torch.save(clf.state_dict(), bad / "model.safetensors")
    with pytest.raises(CheckpointError, match="pickle"):
        load_classifier(bad)
    (bad / "model.safetensors").write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointError, match="pickle"):
        load_classifier(bad)
    (bad / "model.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_classifier(bad)
    # Each kind of checkpoint refuses to load as the other.
    with pytest.raises(CheckpointError, match="diffusion model checkpoint"):
        load_classifier(tiny_checkpoint)
    with pytest.raises(CheckpointError, match="spec format"):
        load_checkpoint(folder)
    # Weights that do not fit the spec, a spec with unknown fields, missing files.
    other = tmp_path / "other"
    save_classifier(build_classifier(tiny_classifier_spec(channels=2)), other)
    (other / "spec.json").write_text((folder / "spec.json").read_text())
    with pytest.raises(CheckpointError, match="do not match"):
        load_classifier(other)
    data = json.loads((folder / "spec.json").read_text())
    data["colour"] = "blue"
    (other / "spec.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="unknown or missing"):
        load_classifier(other)
    with pytest.raises(CheckpointError, match="no such classifier"):
        resolve_classifier(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="not a classifier checkpoint"):
        resolve_classifier(tmp_path)


# ------------------------------------------------------------------------ pipeline and CLI


def test_pipeline_with_classifier_guidance(tiny_checkpoint, case_dirs, tmp_path) -> None:
    model, spec, _ = load_model_cached(tiny_checkpoint, "cpu")
    folder = save_classifier(build_classifier(tiny_classifier_spec()).eval(), tmp_path / "clf")
    clf = load_classifier(folder)
    volume = load_volume(case_dirs[0]).select(spec.modalities)
    z = [int(np.argmax((volume.data[0] > 0).sum(axis=(0, 1))))]
    common = dict(device="cpu", amp=False, steps=1)
    implicit = localize(model, spec, volume.data,
                        LocalizeSettings.from_spec(spec, guidance=0.0, **common), z)
    guided = localize(model, spec, volume.data,
                      LocalizeSettings.from_spec(spec, method="classifier", classifier_scale=0.0,
                                                 **common),
                      z, classifier=clf, classifier_path=folder, classifier_hash="abc")
    assert np.array_equal(guided.difference, implicit.difference)
    prov = guided.provenance
    assert prov["settings"]["method"] == "classifier"
    assert prov["classifier"]["sha256"] == "abc" and prov["classifier"]["scale"] == 0.0
    assert "classifier" not in implicit.provenance
    json.dumps(prov)  # JSON-able: the classifier object itself is not in it
    with pytest.raises(WhatIsHealthyError, match="needs a noisy-image classifier"):
        localize(model, spec, volume.data,
                 LocalizeSettings.from_spec(spec, method="classifier", **common), z)


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _one_line_error(rc: int, err: str, command: str, match: str) -> None:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"whatishealthy {command}: error: "), err
    assert match in lines[0], err


def test_cli_train_classifier_then_localize_and_evaluate(capsys, synthetic_cases, case_dirs,
                                                         tiny_checkpoint, tmp_path) -> None:
    run = tmp_path / "clf-run"
    rc, _, err = _run(capsys, "train-classifier", synthetic_cases, "--out", run, "--size", 16,
                      "--steps", 3, "--batch", 4, "--channels", "8,16", "--attention", "0,1",
                      "--log-every", 1, "--val-every", 3, "--amp", "off", "--no-progress")
    assert rc == 0, err
    clf = load_classifier(resolve_classifier(run))
    assert clf.spec.training["steps"] == 3 and clf.spec.image_size == 16
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and "val_acc" in log[-1]
    assert (run / "slice_store" / "index.json").is_file()
    rc, _, err = _run(capsys, "train-classifier", synthetic_cases, "--out", run, "--size", 16)
    _one_line_error(rc, err, "train-classifier", "--resume")
    # The same store reused by --store, and a store that does not fit is refused.
    rc, _, err = _run(capsys, "train-classifier", synthetic_cases, "--out", tmp_path / "r2",
                      "--store", run / "slice_store", "--size", 32, "--steps", 1)
    _one_line_error(rc, err, "train-classifier", "image_size: store 16, this run 32")

    out = tmp_path / "loc"
    rc, stdout, err = _run(capsys, "localize", case_dirs[0], "--out", out, "--model",
                           tiny_checkpoint, "--method", "classifier", "--classifier", run,
                           "--classifier-scale", 5, "--steps", 1, "--no-progress")
    assert rc == 0, err
    prov = json.loads((out / f"{case_dirs[0].name}_provenance.json").read_text())
    assert prov["settings"]["method"] == "classifier"
    assert prov["settings"]["classifier_scale"] == 5.0
    assert Path(prov["classifier"]["path"]) == (run / "checkpoint").resolve()
    assert len(prov["classifier"]["sha256"]) == 64

    report_path = tmp_path / "eval.json"
    rc, stdout, err = _run(capsys, "evaluate", synthetic_cases, "--cases", 1, "--model",
                           tiny_checkpoint, "--classifier", run, "--steps", 1, "--json",
                           report_path, "--no-progress")
    assert rc == 0, err
    report = json.loads(report_path.read_text())
    assert report["settings"]["method"] == "classifier"  # implied by --classifier
    assert report["classifier"]["scale"] == 100.0  # the classifier spec's recommended scale

    for args, match in [
        (("--method", "classifier"), "needs --classifier"),
        (("--classifier", tiny_checkpoint), "diffusion model checkpoint"),
        (("--method", "implicit", "--classifier", run), "--method classifier"),
        (("--classifier", run, "--guidance", 2), "--classifier-scale"),
    ]:
        rc, _, err = _run(capsys, "localize", case_dirs[0], "--out", tmp_path / "bad",
                          "--model", tiny_checkpoint, *args, "--no-progress")
        _one_line_error(rc, err, "localize", match)
    assert not (tmp_path / "bad").exists()


def test_balanced_batches_feed_the_classifier() -> None:
    labels = np.array([HEALTHY] * 5 + [UNHEALTHY] * 2)
    batch = BalancedSampler(labels, 0).sample(8)
    assert (labels[batch] == HEALTHY).sum() == 4
    spec = ModelSpec()
    assert tiny_classifier_spec().labels == {"healthy": spec.labels["healthy"],
                                             "unhealthy": spec.labels["unhealthy"]}
