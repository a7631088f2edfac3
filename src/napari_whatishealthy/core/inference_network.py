"""The network as inference runs it: a copy of the model that computes the same outputs with less
work per call, made once per model, precision and weights, and kept.

Two changes, both exact (the outputs are bit for bit those of the model itself under the same
autocast; tests/test_inference_network.py):

* **Cross-attention on the label token.** The model's context is one token (the label
  embedding). Attention over a single key gives that key a softmax weight of exactly 1, whatever
  the query, so each transformer block's cross-attention is ``out_proj(to_v(context))`` for every
  pixel: the query and key projections and the attention call are skipped (4 of the 8 attention
  calls per forward).
* **Weights already in the autocast dtype.** Under autocast every call casts each convolution
  and linear layer's float32 weights to bf16 (or fp16) again (3.9 M parameters for the default
  model; on a CPU that is milliseconds per call, on a GPU about a hundred small kernel launches
  per call). The copy holds them in that dtype, so autocast has nothing to cast; the cast is the
  same one autocast makes, so the convolutions see the same numbers.

Only the project's :class:`~.model.ConditionalUNet` is copied (other predictors are used as they
are). The original model is not changed: float32 runs, training and checkpoints still use it.
"""

from __future__ import annotations

import copy
import logging
import threading
import types
import weakref
from typing import Any

import torch
from torch import nn

_log = logging.getLogger(__name__)

__all__ = ["describe_network", "inference_network", "network_for", "weights_key"]

_LOCK = threading.Lock()
# model -> {autocast dtype: (weights key, copy)}; the copies go with their model.
_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def weights_key(model: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer is replaced or changed in place."""
    return tuple((t.data_ptr(), t._version, t.dtype, str(t.device))
                 for t in (*model.parameters(), *model.buffers()))


def _single_token_cross_attention(block: nn.Module) -> None:
    """Make a MONAI ``CrossAttentionBlock`` skip the attention when the context is one token."""
    general = type(block).forward

    def forward(self: nn.Module, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if context is None or context.shape[1] != 1:
            return general(self, x, context)
        # softmax over one key is exactly 1: every query receives that key's value.
        return self.drop_output(self.out_proj(self.to_v(context)))

    block.forward = types.MethodType(forward, block)


def _cast_weights(model: nn.Module, dtype: torch.dtype) -> None:
    """Convolution and linear weights and biases to ``dtype``, layout kept (channels-last)."""
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            module.weight.data = module.weight.data.to(dtype)
            if module.bias is not None:
                module.bias.data = module.bias.data.to(dtype)


def _make_copy(model: nn.Module, amp_dtype: torch.dtype | None) -> nn.Module:
    from monai.networks.blocks import CrossAttentionBlock

    network = copy.deepcopy(model)
    network.eval()
    network.requires_grad_(False)
    for module in network.modules():
        if isinstance(module, CrossAttentionBlock):
            _single_token_cross_attention(module)
    if amp_dtype is not None:
        _cast_weights(network, amp_dtype)
    return network


def inference_network(model: Any, amp_dtype: torch.dtype | None) -> Any:
    """What inference calls for ``model`` run under autocast to ``amp_dtype`` (None: no
    autocast): the kept copy described above for a :class:`~.model.ConditionalUNet`, ``model``
    itself for anything else. The copy is remade when the model's weights change."""
    from .model import ConditionalUNet

    if not isinstance(model, ConditionalUNet):
        return model
    key = (amp_dtype, weights_key(model))
    with _LOCK:
        copies = _COPIES.setdefault(model, {})
        kept = copies.get(amp_dtype)
        if kept is not None and kept[0] == key:
            return kept[1]
        network = _make_copy(model, amp_dtype)
        copies[amp_dtype] = (key, network)
        return network


def network_for(model: Any, amp_dtype: torch.dtype | None, device: torch.device | str,
                backend: str = "auto") -> Any:
    """What a run on ``device`` at ``amp_dtype`` calls for ``model``: the OpenVINO network where
    ``backend`` chooses it (:func:`.openvino_network.choose_backend`), else the torch copy
    above. With ``"auto"`` a network OpenVINO cannot take is run by torch, with one warning."""
    from .errors import WhatIsHealthyError
    from .model import ConditionalUNet
    from .openvino_network import choose_backend, openvino_network

    choice = choose_backend(backend, device, amp_dtype)
    if choice == "torch":
        return inference_network(model, amp_dtype)
    if not isinstance(model, ConditionalUNet):
        if backend == "openvino":
            raise WhatIsHealthyError(f"backend openvino compiles the project's ConditionalUNet, "
                                     f"not a {type(model).__name__}; use --backend torch")
        return model
    try:
        return openvino_network(model, amp_dtype)
    except Exception as exc:
        if backend == "openvino":
            raise WhatIsHealthyError(f"OpenVINO could not compile this network ({type(exc).__name__}: "
                                     f"{str(exc)[:300]}); use --backend torch") from exc
        if not getattr(exc, "_whatishealthy_reported", False):
            _log.warning("OpenVINO could not compile this network (%s: %s); torch runs it",
                         type(exc).__name__, str(exc)[:300])
            exc._whatishealthy_reported = True  # type: ignore[attr-defined]
        return inference_network(model, amp_dtype)


def describe_network(network: Any, amp_dtype: torch.dtype | None) -> str:
    """What ``network`` (from :func:`network_for`) runs as, e.g. ``openvino 2026.4.1, bf16, 2
    threads`` or ``torch, bfloat16 autocast``."""
    text = getattr(network, "description", None)
    if isinstance(text, str):
        return text
    precision = "float32" if amp_dtype is None else f"{str(amp_dtype).removeprefix('torch.')} autocast"
    return f"torch, {precision}"
