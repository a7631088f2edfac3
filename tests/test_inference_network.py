"""The network as inference runs it (core.inference_network): a kept copy of the model that gives
the model's own outputs, bit for bit, with less work per call."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_whatishealthy.core.counterfactual import counterfactual, use_channels_last
from napari_whatishealthy.core.inference_network import inference_network
from napari_whatishealthy.core.model import ConditionalUNet
from napari_whatishealthy.core.registry import load_model_cached, resolve_model
from napari_whatishealthy.core.settings import LocalizeSettings


def _forward(network, x, t, labels, dtype):
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype or torch.bfloat16,
                                                enabled=dtype is not None):
        return network(x.contiguous(memory_format=torch.channels_last), t, labels).float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, None])
def test_the_copy_gives_the_models_outputs_on_the_bundled_model(dtype):
    model, spec, _ = load_model_cached(resolve_model("default"), "cpu")
    use_channels_last(model)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, spec.in_channels, spec.image_size, spec.image_size, generator=gen)
    t = torch.tensor([0, 90, 290])
    labels = torch.tensor([spec.labels["null"], spec.labels["healthy"], spec.labels["unhealthy"]])
    network = inference_network(model, dtype)
    assert network is not model
    expected = _forward(model, x, t, labels, dtype)
    got = _forward(network, x, t, labels, dtype)
    assert expected.abs().max() > 0.1  # the model does predict something
    if dtype is None:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(got, expected)  # the same casts autocast makes: the same numbers
    # The model itself is untouched: float32 weights, still trainable as it was.
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_the_copy_is_kept_and_remade_when_the_weights_change(tiny_checkpoint):
    from napari_whatishealthy.core.model import load_checkpoint

    model = load_checkpoint(tiny_checkpoint)
    first = inference_network(model, torch.bfloat16)
    assert inference_network(model, torch.bfloat16) is first
    assert inference_network(model, None) is not first  # one per precision
    conv = next(m for m in first.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.dtype == torch.bfloat16
    x = torch.randn(2, 4, 16, 16)
    t, labels = torch.tensor([10, 50]), torch.tensor([2, 0])
    before = _forward(first, x, t, labels, torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    second = inference_network(model, torch.bfloat16)
    assert second is not first
    assert torch.equal(_forward(second, x, t, labels, torch.bfloat16),
                       _forward(model, x, t, labels, torch.bfloat16))
    assert not torch.equal(_forward(second, x, t, labels, torch.bfloat16), before)


def test_other_predictors_are_used_as_they_are():
    class Zero(torch.nn.Module):
        def forward(self, x, t, labels):
            return torch.zeros_like(x)

    predictor = Zero()
    assert inference_network(predictor, torch.bfloat16) is predictor
    assert not isinstance(predictor, ConditionalUNet)


def test_a_counterfactual_through_the_copy_equals_one_through_the_model(tiny_checkpoint,
                                                                       monkeypatch):
    from napari_whatishealthy.core import counterfactual as cf
    from napari_whatishealthy.core.model import load_checkpoint

    model = load_checkpoint(tiny_checkpoint)
    slices = np.random.default_rng(0).uniform(-1, 1, (5, 4, 16, 16)).astype(np.float32)
    # torch's copy (OpenVINO's network is tested against the model in test_openvino_network.py)
    settings = LocalizeSettings.from_spec(model.spec, amp="bf16", batch_size=3, backend="torch")
    fast = counterfactual(model, slices, settings)
    monkeypatch.setattr(cf, "network_for", lambda model, dtype, device, backend: model)
    plain = counterfactual(model, slices, settings)
    assert np.abs(fast - slices).max() > 1e-3  # the counterfactual did change the slices
    np.testing.assert_array_equal(fast, plain)
