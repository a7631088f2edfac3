"""Regenerate the user guide's screenshots (docs/images/*.png) from a real napari viewer.

Opens the bundled sample through the plugin, docks the widget from the plugin's manifest, runs
the model, tunes the threshold, paints a correction and saves the mask, taking a screenshot at
each step. Needs a display; on a headless machine run it under Xvfb:

    xvfb-run -a -s "-screen 0 1920x1200x24" .venv/bin/python scripts/screenshots.py

``--model`` picks the checkpoint (default: the bundled ``default`` model). Without a bundled
model the script falls back to a tiny random model, prints a warning and stamps every image
"placeholder: random tiny model", so that such images are never mistaken for real results.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = "napari-whatishealthy"
WIDGET = "Lesion localization"
RADIOLOGICAL = "radiological (anterior up, R on the left)"


def tiny_model(folder: Path) -> Path:
    """A random 32 x 32 model (weights jittered so that its output is not all zero)."""
    import torch

    from napari_whatishealthy.core.model import ModelSpec, NetworkSpec, build_model, save_checkpoint

    spec = ModelSpec(
        image_size=32, name="tiny-random (placeholder)",
        description="random weights: for screenshots of the interface only",
        network=NetworkSpec(channels=(8, 16), attention_levels=(False, True), norm_num_groups=8,
                            num_head_channels=8, label_embedding_dim=8),
    )
    spec.inference.steps = 5
    spec.inference.noise_level = 0.3
    torch.manual_seed(0)
    model = build_model(spec)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return save_checkpoint(model, folder / "tiny")


def settle(app, seconds: float = 0.3) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        app.processEvents()
        time.sleep(0.02)


def stamp(path: Path, text: str | None) -> None:
    if not text:
        return
    from PIL import Image, ImageDraw

    image = Image.open(path).convert("RGB")
    draw = ImageDraw.Draw(image)
    box = draw.textbbox((0, 0), text)
    w, h = box[2] - box[0], box[3] - box[1]
    x, y = image.width - w - 16, 8
    draw.rectangle((x - 6, y - 4, x + w + 6, y + h + 6), fill=(170, 30, 30))
    draw.text((x, y), text, fill=(255, 255, 255))
    image.save(path)


def shoot(viewer, app, path: Path, note: str | None, canvas_only: bool = False) -> Path:
    settle(app)
    viewer.screenshot(str(path), canvas_only=canvas_only, flash=False)
    stamp(path, note)
    print(f"wrote {path}")
    return path


def panels(viewer, app, widget, path: Path, note: str | None) -> Path:
    """Input, healthy, difference, mask and ground truth side by side (canvas screenshots)."""
    from PIL import Image, ImageDraw

    source = widget._session.source_name if widget._session else "flair"
    names = {
        "input": [source],
        "healthy": [f"{source} healthy"],
        "difference": [f"{source} difference"],
        "mask": [source, f"{source} mask"],
        "ground truth": [source, "seg"],
    }
    saved = {layer.name: layer.visible for layer in viewer.layers}
    difference = viewer.layers[f"{source} difference"]
    blending = difference.blending
    difference.blending = "translucent"
    tiles = []
    try:
        for title, visible in names.items():
            for layer in viewer.layers:
                layer.visible = layer.name in visible
            settle(app, 0.2)
            shot = viewer.screenshot(canvas_only=True, flash=False)[..., :3]
            rows = np.flatnonzero(shot.max(axis=(1, 2)) > 0)
            cols = np.flatnonzero(shot.max(axis=(0, 2)) > 0)
            if rows.size and cols.size:  # crop to the brain with a margin
                top, left = max(rows[0] - 10, 0), max(cols[0] - 10, 0)
                shot = shot[top: rows[-1] + 10, left: cols[-1] + 10]
            tile = Image.fromarray(np.ascontiguousarray(shot))
            tile = tile.resize((300, int(300 * tile.height / tile.width)))
            canvas = Image.new("RGB", (tile.width, tile.height + 28), (38, 41, 48))
            canvas.paste(tile, (0, 28))
            ImageDraw.Draw(canvas).text((8, 8), title, fill=(235, 235, 235))
            tiles.append(canvas)
    finally:
        difference.blending = blending
        for layer in viewer.layers:
            layer.visible = saved.get(layer.name, layer.visible)
    height = max(t.height for t in tiles)
    strip = Image.new("RGB", (sum(t.width for t in tiles) + 4 * (len(tiles) - 1), height),
                      (20, 20, 20))
    x = 0
    for tile in tiles:
        strip.paste(tile, (x, 0))
        x += tile.width + 4
    strip.save(path)
    stamp(path, note)
    print(f"wrote {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model name or checkpoint folder "
                        "(default: the bundled default model, else a tiny random placeholder)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "images"), help="output folder")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    from napari_whatishealthy.core.registry import bundled_models

    workdir = Path(tempfile.mkdtemp(prefix="wih-screenshots-"))
    # napari's settings (and this plugin's saved defaults) fresh and temporary: the screenshots
    # show the defaults, and the user's settings are never changed.
    os.environ["NAPARI_CONFIG"] = str(workdir / "napari" / "settings.yaml")
    note = None
    model = args.model
    if model is None:
        if "default" in bundled_models():
            model = "default"
        else:
            model = str(tiny_model(workdir))
            note = "placeholder: random tiny model (no bundled default model yet)"
            print(f"warning: {note}; re-run once models/default exists", file=sys.stderr)

    import napari
    from napari.qt import get_qapp

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    app = get_qapp()
    viewer = napari.Viewer(title="napari: What is Healthy?", show=True)
    viewer.window.resize(1560, 1080)
    viewer.open_sample(PLUGIN, "sample_case")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    if model == "default":
        pass  # the widget's Automatic choice picks it for the four-modality sample
    elif model in bundled_models():
        index = widget.model_combo.findData(str(bundled_models()[model]))
        widget.model_combo.setCurrentIndex(index)
    else:
        widget.set_model(model)
    widget.device_combo.setCurrentText(args.device)
    widget.orientation_combo.setCurrentText(RADIOLOGICAL)
    import json

    from napari_whatishealthy import sample_case_path

    z = json.loads((sample_case_path() / "sample.json").read_text())["best_axial_slice"]
    flair = viewer.layers["flair"]
    viewer.dims.set_point(0, flair.data_to_world((z, 0, 0))[0])
    viewer.layers.selection.active = flair
    settle(app, 1.0)
    shoot(viewer, app, out / "01-open.png", note)

    # Run ---------------------------------------------------------------------------------------
    widget.run()
    running_shot = False
    while widget.is_running:
        settle(app, 0.05)
        if not running_shot and widget.progress.value() >= max(1, widget.progress.maximum() // 2):
            shoot(viewer, app, out / "02-running.png", note)
            running_shot = True
    if widget.last_error:
        print(f"the run failed: {widget.last_error}", file=sys.stderr)
        return 1
    source = widget._session.source_name
    difference = viewer.layers[f"{source} difference"].data
    brain = widget._session.evaluation_region()
    if note:  # a random model flags the whole brain at its default: show a mask-like mask
        widget.threshold.setValue(float(np.percentile(difference[brain], 97)))
    viewer.layers[f"{source} healthy"].visible = False  # input + mask, as users check it
    viewer.layers["seg"].visible = False
    viewer.layers.selection.active = viewer.layers[f"{source} mask"]
    shoot(viewer, app, out / "03-result.png", note)
    panels(viewer, app, widget, out / "04-panels.png", note)

    # Tune --------------------------------------------------------------------------------------
    if note:
        widget.threshold.setValue(float(np.percentile(difference[brain], 94)))
    else:
        widget.threshold.setValue(widget.threshold.value() * 0.8)
    shoot(viewer, app, out / "05-tune.png", note)

    # Review: the histogram under the threshold, the lesion table (a row clicked) ---------------
    review(viewer, app, widget, out, note)

    # Paint -------------------------------------------------------------------------------------
    mask = viewer.layers[f"{source} mask"]
    viewer.layers.selection.active = mask
    mask.mode = "paint"
    mask.brush_size = 6
    mask.selected_label = 1
    # Add the part of the true lesion the mask missed on this slice, a few brush dabs.
    truth = viewer.layers["seg"].data[z] > 0
    missed = np.argwhere(truth & (mask.data[z] == 0))
    if missed.size == 0:
        missed = np.argwhere(truth) if truth.any() else np.array([[60, 60]])
    for a, r in missed[:: max(1, len(missed) // 12)][:12]:
        mask.paint((z, int(a), int(r)), 1)
    settle(app, 0.5)
    shoot(viewer, app, out / "06-paint.png", note)

    # Save --------------------------------------------------------------------------------------
    saved = widget.save_mask(workdir / "Sample_flair_mask.nii.gz")
    shoot(viewer, app, out / "07-save.png", note)
    print(f"(the mask was saved to {saved}, a temporary folder)")
    viewer.close()
    single_volume(app, out, z, args.device)
    small_screen(app, out, model, note)
    cohort(app, out, workdir, model, args.device, note)
    return 0


def review(viewer, app, widget, out: Path, note: str | None) -> None:
    """10: the Mask box (histogram with its threshold markers, lesion table) after a row was
    clicked; 11: the whole window at that moment."""
    widget.scroll_area.ensureWidgetVisible(widget.lesion_table)
    settle(app, 0.5)
    if widget.lesion_table.lesions:
        widget.lesion_table.go_to(widget.lesion_table.lesions[0])
    settle(app, 0.5)
    path = out / "10-lesions-histogram.png"
    widget.result_box.grab().save(str(path))
    stamp(path, note)
    print(f"wrote {path}")
    shoot(viewer, app, out / "11-lesion-jump.png", note)


def small_screen(app, out: Path, model: str, note: str | None) -> None:
    """12: the window on a 1366 x 768 screen: the widget scrolls instead of growing the window."""
    import napari

    viewer = napari.Viewer(title="napari: What is Healthy?", show=True)
    viewer.window.resize(1366, 768)
    viewer.open_sample(PLUGIN, "sample_case")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    if model != "default":
        widget.set_model(model)
    settle(app, 1.0)
    shoot(viewer, app, out / "12-small-screen.png", note)
    viewer.close()


def cohort(app, out: Path, workdir: Path, model: str, device: str, note: str | None) -> None:
    """13: Cohort review of three synthetic cases, two of them run (as `whatishealthy localize`
    writes them), the first shown with a painted correction autosaved."""
    import napari
    from napari.settings import get_plugin_settings

    from napari_whatishealthy.core.cohort import open_cohort, run_case
    from napari_whatishealthy.core.steps import drain
    from napari_whatishealthy.core.synthetic import synthesise

    cases = workdir / "cohort"
    if not cases.exists():
        synthesise(cases, 3, seed=11, voxel_size=3.0, healthy_fraction=0.0)
    found = open_cohort(cases)
    for entry in found.cases[:2]:
        if not entry.done:
            drain(run_case(found, entry, model=model, device=device))
        entry.edited_mask.unlink(missing_ok=True)
    settings = get_plugin_settings(PLUGIN)
    saved = settings.run.model
    viewer = napari.Viewer(title="napari: What is Healthy?", show=True)
    viewer.window.resize(1560, 1080)
    _, panel = viewer.window.add_plugin_dock_widget(PLUGIN, "Cohort review")
    panel.open_folder(cases)
    viewer.camera.orientation2d = ("up", "left")
    if panel.lesion_table.lesions:
        panel.lesion_table.go_to(panel.lesion_table.lesions[0])
    panel.parentWidget().setMinimumWidth(440)
    mask = panel.mask_layer
    if mask is not None:  # a correction: a few voxels of the true lesion the mask missed
        viewer.layers.selection.active = mask
        z = int(viewer.dims.current_step[0])
        truth = next((lay for lay in viewer.layers if lay.name == "seg"), None)
        missed = (np.argwhere((truth.data[z] > 0) & (mask.data[z] == 0))
                  if truth is not None else np.zeros((0, 2)))
        mask.brush_size = 2
        for a, r in missed[:: max(1, len(missed) // 6)][:6]:
            mask.paint((z, int(a), int(r)), 1)
    settle(app, 1.5)  # the autosave
    shoot(viewer, app, out / "13-cohort.png", note)
    settings.run.model = saved
    viewer.close()


def single_volume(app, out: Path, z: int, device: str) -> None:
    """08: a lone FLAIR file with the model on Automatic (the FLAIR model is picked); 09: the same
    image under a name without its modality: the widget asks."""
    import napari

    from napari_whatishealthy.core.registry import bundled_models

    if "flair" not in bundled_models():
        print("warning: no bundled flair model: 08/09 not made", file=sys.stderr)
        return
    viewer = napari.Viewer(title="napari: What is Healthy?", show=True)
    viewer.window.resize(1560, 1080)
    viewer.open_sample(PLUGIN, "sample_flair")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    widget.device_combo.setCurrentText(device)
    widget.orientation_combo.setCurrentText(RADIOLOGICAL)
    flair = viewer.layers["Sample_flair"]
    viewer.dims.set_point(0, flair.data_to_world((z, 0, 0))[0])
    widget.run()
    while widget.is_running:
        settle(app, 0.05)
    if widget.last_error:
        print(f"the FLAIR-only run failed: {widget.last_error}", file=sys.stderr)
    viewer.layers["Sample_flair healthy"].visible = False
    viewer.layers["seg"].visible = False
    viewer.layers.selection.active = viewer.layers["Sample_flair mask"]
    settle(app, 1.0)
    shoot(viewer, app, out / "08-single-flair.png", None)
    viewer.close()

    viewer = napari.Viewer(title="napari: What is Healthy?", show=True)
    viewer.window.resize(1560, 1080)
    layer = viewer.add_image(np.asarray(flair.data), name="scan", scale=flair.scale,
                             translate=flair.translate, units=flair.units)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    widget.orientation_combo.setCurrentText(RADIOLOGICAL)
    viewer.dims.set_point(0, layer.data_to_world((z, 0, 0))[0])
    settle(app, 1.0)
    shoot(viewer, app, out / "09-ask-modality.png", None)
    viewer.close()


if __name__ == "__main__":
    sys.exit(main())
