"""`whatishealthy demo`: the sample case in napari with the widget, or --headless files and a
PNG figure."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli import _add_inference_options, _Bar, _files_in, _open_session
from .core.errors import InputError, WhatIsHealthyError


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="open napari with the sample case and the widget; "
                       "--headless: run the pipeline and write outputs and a PNG figure")
    p.add_argument("--headless", action="store_true", help="no window: write files only")
    p.add_argument("--out", default="whatishealthy-demo",
                   help="output folder for --headless (default whatishealthy-demo); the demo "
                        "replaces its own earlier outputs there")
    p.add_argument("--sample", default=None,
                   help="a case folder to use instead of the bundled sample")
    _add_inference_options(p)
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .core.model_choice import AUTO
    from .core.registry import DEFAULT_MODEL, resolve_model

    # A missing bundled model is reported before anything else; the sample has all four
    # modalities, so "auto" is the four-channel default.
    resolve_model(DEFAULT_MODEL if args.model == AUTO else args.model)
    if not args.headless and (args.classifier is not None or args.method == "classifier"):
        raise WhatIsHealthyError("classifier guidance in the demo needs --headless (the window "
                                 "uses the widget's settings)")
    from .core.sample import sample_case_path

    sample = Path(args.sample) if args.sample else sample_case_path()
    if not args.headless:
        return _demo_gui(sample, args)
    import numpy as np

    from .core.cases import case_name_from_files
    from .core.figure import save_figure
    from .core.results import check_outputs, output_paths, write_outputs
    from .core.steps import drain
    from .core.volume import load_volume

    session, settings, guide = _open_session(args)
    folder = session.folder
    volume = load_volume(sample, name=case_name_from_files(sample)).select(session.spec.modalities)
    out = Path(args.out)
    if out.resolve() == sample.resolve():
        raise InputError(f"{out}: is the sample folder; choose another --out")
    protected = [*volume.input_paths, *_files_in(folder)]
    targets = output_paths(out, volume.name, session.spec.modalities)
    targets["figure"] = out / f"{volume.name}_figure.png"
    check_outputs(targets, protected, overwrite=True, voxels=int(np.prod(volume.shape)))
    gen = session.iter_localize(volume.data, settings, guide, inputs=volume.source_paths)
    bar = _Bar(volume.name, not args.no_progress)
    try:
        result = drain(gen, bar)
    finally:
        bar.close()
    paths = write_outputs(result, volume, out, overwrite=True, inputs=_files_in(folder))
    figure = out / f"{volume.name}_figure.png"
    save_figure(volume, result, figure, inputs=_files_in(folder))
    print(f"sample {sample}: {int(result.mask.sum())} voxels flagged at threshold "
          f"{result.threshold_used:.4g}")
    for path in [*paths.values(), figure]:
        print(f"wrote {path}")
    return 0


def _demo_gui(sample: Path, args: argparse.Namespace) -> int:
    try:
        import napari
    except ImportError:
        raise WhatIsHealthyError("napari is not installed: pip install 'napari-whatishealthy[gui]'"
                                 " or run `whatishealthy demo --headless`") from None
    viewer = napari.Viewer(title="What is Healthy? demo")
    try:
        if args.sample is None:
            viewer.open_sample("napari-whatishealthy", "sample_case")
        else:
            viewer.open(str(sample), plugin="napari-whatishealthy")
    except Exception:  # the plugin's reader failed: show the volumes plainly
        from .core.volume import load_volume

        volume = load_volume(sample)
        for i, m in enumerate(volume.modalities):
            viewer.add_image(volume.data[i], name=f"{volume.name}_{m}", affine=volume.affine,
                             visible=(i == 0))
        if volume.segmentation is not None:
            viewer.add_labels(volume.segmentation, name=f"{volume.name}_seg",
                              affine=volume.affine, opacity=0.4, visible=False)
    try:
        from ._widget import LocalizeWidget
        from .core.model_choice import AUTO
        from .core.registry import resolve_model

        # Docked as the Plugins menu docks it: the same title, the same layer proxies.
        _, widget = viewer.window.add_plugin_dock_widget("napari-whatishealthy",
                                                         "Lesion localization")
        if not isinstance(widget, LocalizeWidget):
            raise ImportError("the plugin's widget contribution did not give the widget")
        if args.model != AUTO:  # otherwise the widget's Automatic choice
            widget.set_model(str(resolve_model(args.model)))
    except ImportError as exc:
        print(f"whatishealthy demo: warning: the widget could not be loaded ({exc})",
              file=sys.stderr)
    napari.run()
    return 0


