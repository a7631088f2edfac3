"""The demo's PNG figure: axial slices through the lesion, input FLAIR, healthy, difference,
mask and the ground truth (when the case has one). Neurological view: anterior up, the
patient's right on the right.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["figure_slices", "save_figure"]

LESION_RED = (255, 40, 40)
TRUTH_GREEN = (40, 220, 40)


def figure_slices(volume: Any, result: Any, count: int = 3) -> list[int]:
    """Up to ``count`` axial slices: the one with the most lesion (ground truth, else mask,
    else brain) and two halfway to the ends of that region."""
    if volume.segmentation is not None and (volume.segmentation > 0).any():
        area = (volume.segmentation > 0).sum(axis=(0, 1))
    elif result.mask.any():
        area = result.mask.sum(axis=(0, 1))
    else:
        area = result.brain.sum(axis=(0, 1))
    zs = np.flatnonzero(area)
    if zs.size == 0:
        return [volume.shape[2] // 2]
    best = int(np.argmax(area))
    lo, hi = int(zs[0]), int(zs[-1])
    picks = [best, (lo + best) // 2, (best + hi + 1) // 2]
    out: list[int] = []
    for z in picks:
        if z not in out:
            out.append(z)
    return sorted(out)[:count]


class _Painter:
    """Slices to RGB tiles with the figure's fixed display ranges."""

    def __init__(self, image: np.ndarray, result: Any) -> None:
        brain = result.brain
        hi = float(np.percentile(image[brain], 99.9)) if brain.any() else float(image.max() or 1.0)
        self.hi = hi if hi > 0 else 1.0
        self.dmax = max(float(np.percentile(result.difference[brain], 99.9))
                        if brain.any() else 0.0, 2.0 * result.threshold_used, 1e-6)

    @staticmethod
    def view(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a.T[::-1])  # rows: anterior at the top

    def gray(self, a: np.ndarray) -> np.ndarray:
        g = np.clip(self.view(a) / self.hi, 0, 1) * 255
        return np.repeat(g[..., None], 3, axis=-1).astype(np.uint8)

    def hot(self, a: np.ndarray) -> np.ndarray:
        v = np.clip(self.view(a) / self.dmax, 0, 1)
        rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)],
                       axis=-1)
        return (rgb * 255).astype(np.uint8)

    def overlay(self, a: np.ndarray, m: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
        rgb = self.gray(a).astype(np.float32)
        sel = self.view(m) > 0
        rgb[sel] = 0.45 * rgb[sel] + 0.55 * np.array(colour, np.float32)
        return rgb.astype(np.uint8)


def _rows(volume: Any, result: Any, channel: int, zs: list[int], paint: _Painter
          ) -> list[list[np.ndarray]]:
    image, healthy = volume.data[channel], result.healthy[channel]
    rows = []
    for z in zs:
        tiles = [paint.gray(image[..., z]), paint.gray(healthy[..., z]),
                 paint.hot(result.difference[..., z]),
                 paint.overlay(image[..., z], result.mask[..., z], LESION_RED)]
        if volume.segmentation is not None:
            tiles.append(paint.overlay(image[..., z], volume.segmentation[..., z], TRUTH_GREEN))
        rows.append(tiles)
    return rows


def _compose(rows: list[list[np.ndarray]], zs: list[int], titles: list[str], footer: str,
             tile: int) -> Any:
    from PIL import Image, ImageDraw

    h0, w0 = rows[0][0].shape[:2]
    scale = tile / max(h0, w0)
    th, tw = max(1, round(h0 * scale)), max(1, round(w0 * scale))
    header, label_w, pad = 22, 48, 4
    canvas = Image.new("RGB", (label_w + len(titles) * (tw + pad), header + len(rows) * (th + pad)),
                       (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(titles):
        draw.text((label_w + j * (tw + pad) + 4, 4), title, fill=(255, 255, 255))
    for i, (z, tiles) in enumerate(zip(zs, rows, strict=True)):
        y = header + i * (th + pad)
        draw.text((4, y + th // 2 - 6), f"z={z}", fill=(255, 255, 255))
        for j, t in enumerate(tiles):
            img = Image.fromarray(t, "RGB").resize((tw, th), Image.Resampling.NEAREST)
            canvas.paste(img, (label_w + j * (tw + pad), y))
    out = Image.new("RGB", (canvas.width, canvas.height + 18), (0, 0, 0))
    out.paste(canvas, (0, 0))
    ImageDraw.Draw(out).text((4, canvas.height + 2), footer, fill=(200, 200, 200))
    return out


def save_figure(volume: Any, result: Any, path: str | Path, tile: int = 200,
                overwrite: bool = True, inputs: Sequence[str | Path] = ()) -> Path:
    """Write the figure of ``result`` (from ``volume``) as a PNG. Never written over the
    volume's files or ``inputs``."""
    from .output import write_file

    inputs = (*volume.input_paths, *inputs)
    channel = volume.modalities.index("flair") if "flair" in volume.modalities else 0
    paint = _Painter(volume.data[channel], result)
    titles = ["input FLAIR", "healthy", "difference", "mask"]
    if volume.segmentation is not None:
        titles.append("ground truth")
    zs = figure_slices(volume, result)
    footer = (f"threshold {result.threshold_used:.3g}; difference shown 0..{paint.dmax:.3g}; "
              "anterior up, patient's right on the right")
    image = _compose(_rows(volume, result, channel, zs, paint), zs, titles, footer, tile)
    return write_file(path, lambda tmp: image.save(tmp, format="PNG"), inputs, overwrite)
