"""The OpenVINO backend (core.openvino_network): which backend a run gets, that the compiled
network computes what the model computes, that its conversion is kept on disk and remade when it
must be, and that a run falls back to torch (or says why) when OpenVINO cannot take it."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from napari_whatishealthy.core import openvino_network as ovn
from napari_whatishealthy.core.errors import WhatIsHealthyError
from napari_whatishealthy.core.inference_network import describe_network, network_for
from napari_whatishealthy.core.model import load_checkpoint
from napari_whatishealthy.core.settings import LocalizeSettings

pytestmark = pytest.mark.skipif(not ovn.openvino_installed(), reason="openvino not installed")


def _inputs(spec, batch: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, spec.in_channels, spec.image_size, spec.image_size, generator=gen)
    t = torch.randint(0, 300, (batch,), generator=gen)
    labels = torch.tensor([spec.labels["null"], spec.labels["healthy"]] * batch)[:batch]
    return x, t, labels


def _model(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint)  # a fresh object: nothing kept from other tests


def test_openvino_is_imported_without_its_usage_telemetry(tmp_path):
    # A fresh process: OpenVINO reports usage over the network on import unless told not to.
    code = ("import sys\n"
            "from napari_whatishealthy.core.openvino_network import import_openvino\n"
            "import_openvino().Core()\n"
            "import openvino.tools.ovc.convert_impl as impl\n"
            "print(impl.tm.__name__)\n")
    env = {**os.environ, "HOME": str(tmp_path)}  # where the telemetry would keep its files
    env.pop("CI", None)  # CI=true turns the telemetry off by itself
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "openvino.tools.ovc.telemetry_stub"
    assert not (tmp_path / "intel").exists()  # no client id, no usage count written


def test_choose_backend_follows_the_device_precision_and_the_machine(monkeypatch):
    monkeypatch.setattr(ovn, "openvino_installed", lambda: True)
    monkeypatch.setattr(ovn.platform, "machine", lambda: "x86_64")
    assert ovn.choose_backend("auto", "cpu", torch.bfloat16) == "openvino"
    assert ovn.choose_backend("auto", "cpu", None) == "openvino"
    assert ovn.choose_backend("auto", "cpu", torch.float16) == "torch"  # OpenVINO has no fp16 here
    assert ovn.choose_backend("auto", "cuda", torch.bfloat16) == "torch"
    assert ovn.choose_backend("torch", "cpu", torch.bfloat16) == "torch"
    monkeypatch.setattr(ovn.platform, "machine", lambda: "arm64")  # not measured there
    assert ovn.choose_backend("auto", "cpu", torch.bfloat16) == "torch"
    assert ovn.choose_backend("openvino", "cpu", torch.bfloat16) == "openvino"  # asked for
    with pytest.raises(WhatIsHealthyError, match="runs on a CPU.*--device cpu"):
        ovn.choose_backend("openvino", "cuda", None)
    with pytest.raises(WhatIsHealthyError, match="bf16 or float32"):
        ovn.choose_backend("openvino", "cpu", torch.float16)
    monkeypatch.setattr(ovn, "openvino_installed", lambda: False)
    assert ovn.choose_backend("auto", "cpu", torch.bfloat16) == "torch"
    with pytest.raises(WhatIsHealthyError, match="pip install openvino"):
        ovn.choose_backend("openvino", "cpu", None)
    with pytest.raises(WhatIsHealthyError, match="backend must be one of auto, torch, openvino"):
        ovn.choose_backend("onnx", "cpu", None)
    with pytest.raises(WhatIsHealthyError, match="backend must be one of"):
        LocalizeSettings(backend="tensorrt").validate()


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16])
def test_the_compiled_network_computes_what_the_model_computes(tiny_checkpoint, tmp_path,
                                                               amp_dtype):
    model = _model(tiny_checkpoint)
    network = ovn.openvino_network(model, amp_dtype, threads=1, cache=tmp_path)
    assert network.description.startswith("openvino ")
    assert ("bf16" if amp_dtype else "f32") in network.description
    for batch in (1, 3, 8):  # one export, a dynamic batch
        x, t, labels = _inputs(model.spec, batch, seed=batch)
        with torch.inference_mode():
            expected = model(x, t, labels)
        got = network(x.contiguous(memory_format=torch.channels_last), t, labels)
        assert got.shape == expected.shape and got.dtype == torch.float32
        assert expected.abs().max() > 0.05  # the model does predict something
        error = (got - expected).abs()
        if amp_dtype is None:
            assert float(error.max()) < 1e-4
        else:  # bf16 rounding, about as large as torch's own autocast
            assert float(error.mean()) < 0.02 and float(error.max()) < 0.2


def test_the_conversion_is_kept_on_disk_and_read_back(tiny_checkpoint, tmp_path, monkeypatch):
    model = _model(tiny_checkpoint)
    first = ovn.openvino_network(model, None, threads=1, cache=tmp_path)
    assert first.source == "converted"
    assert ovn.openvino_network(model, None, threads=1, cache=tmp_path) is first  # in memory
    saved = [p for p in tmp_path.iterdir() if (p / "network.xml").is_file()]
    assert len(saved) == 1 and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    x, t, labels = _inputs(model.spec, 4)
    before = first(x, t, labels)

    # Another process (the same weights, a new model object) reads it and converts nothing.
    def no_conversion(network):
        raise AssertionError("converted again")

    monkeypatch.setattr(ovn, "_convert", no_conversion)
    again = ovn.openvino_network(_model(tiny_checkpoint), None, threads=1, cache=tmp_path)
    assert again.source == "cache"
    assert torch.equal(again(x, t, labels), before)


def test_changed_weights_or_a_damaged_cache_are_converted_again(tiny_checkpoint, tmp_path,
                                                                caplog):
    model = _model(tiny_checkpoint)
    first = ovn.openvino_network(model, None, threads=1, cache=tmp_path)
    x, t, labels = _inputs(model.spec, 2)
    before = first(x, t, labels)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    changed = ovn.openvino_network(model, None, threads=1, cache=tmp_path)
    assert changed is not first and changed.source == "converted"
    with torch.inference_mode():
        expected = model(x, t, labels)
    assert float((changed(x, t, labels) - expected).abs().max()) < 1e-4
    assert not torch.allclose(changed(x, t, labels), before)
    assert len([p for p in tmp_path.iterdir() if (p / "network.xml").is_file()]) == 2

    for folder in tmp_path.iterdir():
        (folder / "network.xml").write_text("not an IR")
    with caplog.at_level(logging.WARNING):
        remade = ovn.openvino_network(_model(tiny_checkpoint), None, threads=1, cache=tmp_path)
    assert remade.source == "converted" and "could not be read" in caplog.text
    assert torch.equal(remade(x, t, labels), before)


def test_an_unwritable_cache_still_gives_a_network(tiny_checkpoint, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING):
        network = ovn.openvino_network(_model(tiny_checkpoint), None, threads=1, cache=blocker)
    assert network.source == "converted" and "could not keep" in caplog.text


def test_threads_share_one_compiled_network(tiny_checkpoint, tmp_path):
    model = _model(tiny_checkpoint)
    network = ovn.openvino_network(model, None, threads=1, cache=tmp_path)
    inputs = [_inputs(model.spec, 3, seed=s) for s in range(4)]
    with torch.inference_mode():
        expected = [model(*i) for i in inputs]
    results: dict[int, torch.Tensor] = {}

    def run(k: int) -> None:
        for _ in range(5):
            results[k] = network(*inputs[k])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for k in range(4):
        assert float((results[k] - expected[k]).abs().max()) < 1e-4


def test_auto_falls_back_to_torch_once_and_openvino_says_why(tiny_checkpoint, monkeypatch,
                                                             caplog):
    monkeypatch.setattr(ovn.platform, "machine", lambda: "x86_64")

    def broken(network):
        raise RuntimeError("unsupported operation")

    monkeypatch.setattr(ovn, "_convert", broken)
    monkeypatch.setenv("WHATISHEALTHY_OPENVINO_CACHE", "")  # nothing on disk to read instead
    model = _model(tiny_checkpoint)
    with caplog.at_level(logging.WARNING):
        network = network_for(model, None, "cpu", "auto")
        network_for(model, None, "cpu", "auto")
    assert not isinstance(network, ovn.OpenVINONetwork)
    assert describe_network(network, None) == "torch, float32"
    assert caplog.text.count("unsupported operation") == 1  # said once
    with pytest.raises(WhatIsHealthyError, match="OpenVINO could not compile.*--backend torch"):
        network_for(model, None, "cpu", "openvino")


def test_a_localization_through_openvino_matches_torch(tiny_checkpoint, lesion_case):
    from napari_whatishealthy.core.pipeline import localize
    from napari_whatishealthy.core.volume import load_volume

    model = _model(tiny_checkpoint)
    volume = load_volume(lesion_case).select(model.spec.modalities)
    results = {}
    for backend in ("torch", "openvino"):
        settings = LocalizeSettings.from_spec(model.spec, device="cpu", amp=False,
                                              backend=backend)
        results[backend] = localize(model, model.spec, volume.data, settings)
    torch_run, ov_run = results["torch"], results["openvino"]
    assert ov_run.provenance["network"].startswith("openvino ")
    assert torch_run.provenance["network"] == "torch, float32"
    assert ov_run.provenance["settings"]["backend"] == "openvino"
    assert torch_run.difference.max() > 0.01
    np.testing.assert_allclose(ov_run.difference, torch_run.difference, atol=2e-4)
    np.testing.assert_allclose(ov_run.healthy, torch_run.healthy, rtol=1e-3, atol=1e-2)


def test_the_backend_option_reaches_the_run(capsys, tiny_checkpoint, case_dirs, tmp_path):
    from napari_whatishealthy import cli

    case = case_dirs[0]
    for choice, prefix in (("torch", "torch, "), ("openvino", "openvino ")):
        out = tmp_path / choice
        rc = cli.main(["localize", str(case), "--out", str(out), "--model", str(tiny_checkpoint),
                       "--backend", choice, "--no-progress"])
        assert rc == 0, capsys.readouterr().err
        prov = json.loads((out / f"{case.name}_provenance.json").read_text())
        assert prov["settings"]["backend"] == choice
        assert prov["network"].startswith(prefix)
    capsys.readouterr()
    rc = cli.main(["localize", str(case), "--out", str(tmp_path / "x"), "--backend", "onnx"])
    assert rc == 2 and "--backend" in capsys.readouterr().err
