"""The widget's saved settings (napari Preferences > What is Healthy): the default model and
device are restored when the widget opens and saved when the user picks others (in the menus or
with Browse; a script's ``set_model`` does not change them); the batch size and the last folders
are read where they are used. Storage is :mod:`._settings`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import _settings as settings
from ._widget_state import AUTO


class SettingsHandlers:
    """Mixed into LocalizeWidget."""

    def _restore_settings(self: Any) -> None:
        """The saved model and device; from here on, choosing one saves it as the default."""
        from .core.registry import bundled_models

        model = str(settings.get("run", "model") or AUTO)
        bundled = bundled_models()
        if model in bundled:
            model = str(bundled[model])
        if model != AUTO and (self.model_combo.findData(model) >= 0 or Path(model).is_dir()):
            self.set_model(model)
        device = str(settings.get("run", "device"))
        if self.device_combo.findText(device) >= 0:
            self.device_combo.setCurrentText(device)
        # ``activated``: a choice made by the user, not a change made by code.
        self.device_combo.activated.connect(
            lambda _index: settings.put("run", "device", self.device_combo.currentText()))
        self.model_combo.activated.connect(lambda _index: self._remember_model())
        self._settings_ready = True

    def _remember_model(self: Any) -> None:
        if not getattr(self, "_settings_ready", False):
            return
        from .core.registry import bundled_models

        ref = self.model_combo.currentData()
        names = {str(path): name for name, path in bundled_models().items()}
        settings.put("run", "model", names.get(str(ref), str(ref)))

    @staticmethod
    def _saved_batch_size() -> int | None:
        return int(settings.get("run", "batch_size") or 0) or None  # 0: the device's default

    @staticmethod
    def _last_folder(kind: str) -> str:
        folder = str(settings.get("folders", kind) or "")
        return folder if folder and Path(folder).is_dir() else ""

    @staticmethod
    def _remember_folder(kind: str, folder: str | Path) -> None:
        settings.put("folders", kind, str(folder))
