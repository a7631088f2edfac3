"""One localize session, the path both front ends take: the model (and the classifier of
classifier guidance) loaded once and cached, the settings from the model's spec, and the run
with its provenance. The CLI's ``localize``, ``evaluate`` and ``demo`` and the widget's
background job call this; neither loads a network or builds provenance by itself.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import WhatIsHealthyError
from .model import ModelSpec
from .settings import LocalizeSettings
from .steps import Progress

__all__ = ["Guide", "LocalizeSession"]


@dataclass
class Guide:
    """The noisy-image classifier of classifier guidance (none for classifier-free guidance),
    with what the provenance records of it."""

    classifier: Any = None
    path: Path | None = None
    sha256: str | None = None

    def record(self, settings: LocalizeSettings) -> dict[str, Any] | None:
        """The provenance entry of the classifier (None: classifier-free guidance)."""
        if self.classifier is None:
            return None
        from .classifier import classifier_record

        return classifier_record(self.classifier, self.path, self.sha256,
                                 settings.classifier_scale)

    def localize_kwargs(self) -> dict[str, Any]:
        if self.classifier is None:
            return {}
        return {"classifier": self.classifier, "classifier_path": self.path,
                "classifier_hash": self.sha256}


@dataclass
class LocalizeSession:
    """A loaded model (from the checkpoint cache: loading it again costs nothing)."""

    model: Any
    spec: ModelSpec
    folder: Path
    sha256: str
    device: str = "auto"

    @classmethod
    def load(cls, reference: str | Path, device: str = "auto") -> LocalizeSession:
        """``reference``: a bundled model's name or a checkpoint folder."""
        from .registry import load_model_cached, resolve_model

        folder = resolve_model(reference)
        model, spec, digest = load_model_cached(folder, device)
        return cls(model, spec, folder, digest, device)

    def settings(self, **overrides: Any) -> LocalizeSettings:
        """The model's recommended settings with ``overrides`` (None values ignored), checked."""
        return LocalizeSettings.from_spec(self.spec, **overrides)

    def load_guide(self, reference: str | Path | None, settings: LocalizeSettings) -> Guide:
        """The classifier of ``settings.method == "classifier"`` (cached), checked against the
        model and the timestep plan before any work; an empty Guide otherwise."""
        if settings.method != "classifier":
            return Guide()
        if reference is None:
            raise WhatIsHealthyError(
                "method 'classifier' needs a noisy-image classifier (--classifier PATH; train "
                "one with `whatishealthy train-classifier`)"
            )
        from .classifier import check_compatible, load_classifier_cached, resolve_classifier
        from .counterfactual import timestep_plan

        folder = resolve_classifier(reference)
        classifier, cspec, digest = load_classifier_cached(folder, self.device)
        check_compatible(cspec, self.spec,
                         timestep_plan(self.spec.schedule, settings.noise_level, settings.steps))
        return Guide(classifier, folder, digest)

    def network(self, settings: LocalizeSettings) -> str:
        """Make (once; kept) what runs the network for ``settings`` and say what it is, e.g.
        ``openvino 2026.4.1, bf16, 2 threads in 2 streams``. The first OpenVINO run of a model on
        a machine converts it (seconds); a caller that shows progress says so first."""
        from .counterfactual import model_device, network_description
        from .device import resolve_device

        device = model_device(self.model) or resolve_device(settings.device)
        return network_description(self.model, settings, device)

    def model_record(self) -> dict[str, Any]:
        """What a report records of the model."""
        return {"name": self.spec.name, "path": str(self.folder), "sha256": self.sha256}

    def iter_localize(
        self,
        data: np.ndarray,
        settings: LocalizeSettings,
        guide: Guide | None = None,
        z_slices: Sequence[int] | None = None,
        inputs: Iterable[str | Path] = (),
        prepared: Any = None,
    ) -> Generator[Progress, None, Any]:
        """:func:`.pipeline.iter_localize` with this model and its provenance."""
        from .pipeline import iter_localize

        return iter_localize(
            self.model, self.spec, data, settings, z_slices,
            model_path=self.folder, model_hash=self.sha256, inputs=inputs, prepared=prepared,
            **(guide or Guide()).localize_kwargs(),
        )
