"""Which model runs on an input: the bundled model that the input's modalities can feed.

``choose_model(available)`` is what ``localize``, ``evaluate`` and the widget call when the model
is ``"auto"`` (their default): among the bundled models whose channels are all in
``available``, the one that uses the most of them (four BraTS modalities: the four-channel
``default`` model; a lone FLAIR: the ``flair`` model); ties go to ``default``, then by name. A
named model or a checkpoint folder is checked the same way, so that a FLAIR-only input given to a
four-channel model fails before any work, with a message naming what is missing and which
bundled model would fit.

An input whose modality is unknown (a single NIfTI file with no modality in its name, marked
``"image"`` by the volume loader) is never guessed: the caller asks (``--modality``, or the
widget's modality combo).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .model import ModelSpec, load_spec
from .registry import DEFAULT_MODEL, bundled_models, resolve_model

AUTO = "auto"
#: What the volume loader calls a channel whose modality it could not tell.
UNKNOWN_MODALITY = "image"

__all__ = ["AUTO", "UNKNOWN_MODALITY", "ModelChoice", "bundled_specs", "choose_model"]


@dataclass(frozen=True)
class ModelChoice:
    """A model picked for an input, and a sentence saying why (shown to the user)."""

    folder: Path
    spec: ModelSpec
    reason: str

    @property
    def name(self) -> str:
        return self.spec.name


def bundled_specs() -> dict[str, tuple[Path, ModelSpec]]:
    """Name -> (folder, spec) of every bundled model."""
    return {name: (folder, load_spec(folder)) for name, folder in bundled_models().items()}


def _listing(specs: dict[str, tuple[Path, ModelSpec]]) -> str:
    return "; ".join(f"{name}: {', '.join(spec.modalities)}" for name, (_, spec) in specs.items())


def choose_model(available: Iterable[str], requested: str | Path | None = AUTO) -> ModelChoice:
    """The model for an input providing the modalities ``available``.

    ``requested``: ``"auto"`` / None (pick a bundled model), or a bundled name or checkpoint
    folder (checked against ``available``). Raises :class:`InputError` when the modality is
    unknown, or when no model fits, saying what is needed.
    """
    have = tuple(dict.fromkeys(str(m) for m in available))
    if UNKNOWN_MODALITY in have:
        raise InputError(
            "the modality of the input is not in its name: say which it is (--modality flair, "
            "t1, t1ce or t2 on the command line; the Modality choice in the widget), or name the "
            "file <case>_<modality>.nii.gz"
        )
    if not have:
        raise InputError("no input modality to choose a model for")
    specs = bundled_specs()
    if requested is not None and str(requested) not in ("", AUTO):
        folder = resolve_model(requested)
        spec = load_spec(folder)
        missing = [m for m in spec.modalities if m not in have]
        if missing:
            fits = [n for n, (_, s) in specs.items() if set(s.modalities) <= set(have)]
            hint = (f"; the bundled model {fits[0]!r} fits this input (or leave the model on "
                    "auto)") if fits else ""
            raise InputError(
                f"the model {spec.name!r} needs {', '.join(spec.modalities)}, the input has "
                f"{', '.join(have)} (missing {', '.join(missing)}){hint}"
            )
        return ModelChoice(folder, spec, f"{spec.name} (chosen by you)")
    fitting = [(n, f, s) for n, (f, s) in specs.items() if set(s.modalities) <= set(have)]
    if not fitting:
        bundled = _listing(specs) or "none"
        raise InputError(
            f"no bundled model fits an input with {', '.join(have)}: the bundled models need "
            f"{bundled}. Open the missing modalities, or train a model on what you have "
            f"(`whatishealthy train DATA --modalities {','.join(have)}`) and choose it"
        )
    fitting.sort(key=lambda item: (-len(item[2].modalities), item[0] != DEFAULT_MODEL, item[0]))
    name, folder, spec = fitting[0]
    used = ", ".join(spec.modalities)
    unused = [m for m in have if m not in spec.modalities]
    reason = f"{name} (automatic: the input has {', '.join(have)}; this model uses {used}"
    reason += f", not {', '.join(unused)})" if unused else ")"
    return ModelChoice(folder.resolve(), spec, reason)
