"""The plugin's saved settings: napari's plugin ``configurations`` (napari.yaml), shown under
Preferences and saved by napari in its settings folder.

``run``: the default device, model and batch size; ``folders``: the last folders used (model
checkpoints, saved masks, cohort review). Reading never fails: without napari's plugin settings
(an older napari, or a settings file it cannot read) the manifest's defaults are used and
nothing is saved.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

PLUGIN = "napari-whatishealthy"
DEFAULTS: dict[str, dict[str, Any]] = {
    "run": {"device": "auto", "model": "auto", "batch_size": 0},
    "folders": {"checkpoint": "", "save": "", "cohort": ""},
}


def _section(section: str) -> Any:
    try:
        from napari.settings import get_plugin_settings

        return getattr(get_plugin_settings(PLUGIN), section)
    except Exception as exc:  # no plugin settings in this napari, or not registered
        log.debug("plugin settings unavailable: %s", exc)
        return None


def get(section: str, key: str) -> Any:
    """A saved value (the manifest's default when none is saved or settings are unavailable)."""
    default = DEFAULTS[section][key]
    values = _section(section)
    if values is None:
        return default
    value = getattr(values, key, default)
    return default if value is None else value


def put(section: str, key: str, value: Any) -> bool:
    """Save a value (napari writes its settings file); returns whether it was saved."""
    if key not in DEFAULTS[section]:
        raise KeyError(f"no setting {section}.{key}")
    values = _section(section)
    if values is None:
        return False
    try:
        setattr(values, key, value)
    except Exception as exc:  # a value the schema refuses: keep the old one
        log.debug("could not save %s.%s=%r: %s", section, key, value, exc)
        return False
    return True
