"""Render the screenshot of the astrovl napari plugin used in docs/napari.rst.

Opens NGC 1316 (astropy's test image) through the plugin's FITS reader, docks
the "Search" widget, builds an embedding index of the real telescope images
that ship with astropy and scikit-image, runs a text search and saves a
screenshot of the whole window (viewer and docked widget with its results).

It needs a display; on a headless machine run it under a virtual X server::

    xvfb-run -a python docs/scripts/make_napari_screenshot.py

By default the CLIP model is the small untrained ``TINY_CLIP_CONFIG`` (offline,
seconds on a CPU), so the scores are illustrative only; pass a trained model
(``--clip-model ViT-B-16 --pretrained openai`` or a saved directory) for
meaningful rankings.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUTPUT = ROOT / "docs" / "_static" / "napari_plugin.png"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", "-o", type=Path, default=DEFAULT_OUTPUT, help="PNG file to write")
    p.add_argument("--clip-model", default=None,
                   help="CLIP model name or saved directory (default: an untrained tiny CLIP)")
    p.add_argument("--pretrained", default="", help="open_clip pretrained tag for --clip-model")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--query", default="a dense globular star cluster", help="text query shown")
    p.add_argument("--size", type=int, nargs=2, default=(1300, 820), metavar=("WIDTH", "HEIGHT"),
                   help="window size in pixels")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for each job")
    return p.parse_args(argv)


def collect_images(folder: Path) -> list[Path]:
    """Copy the real images shipped with astropy (and scikit-image) into ``folder``."""
    import astropy

    base = Path(astropy.__file__).parent
    sources = {
        "m13.fits": base / "io/fits/hdu/compressed/tests/data/m13.fits",
        "ngc1316.fits": base / "io/fits/tests/data/comp.fits",
        "dss_plate.fits.gz": base / "wcs/tests/data/dss.14.29.56-62.41.05.fits.gz",
    }
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, src in sources.items():
        if src.exists():
            shutil.copy(src, folder / name)
            out.append(folder / name)
    try:
        from PIL import Image
        from skimage import data as skdata

        Image.fromarray(skdata.hubble_deep_field()).save(folder / "hubble_deep_field.png")
        out.append(folder / "hubble_deep_field.png")
    except ImportError:
        pass
    return out


def wait(widget, app, timeout: float) -> None:
    start = time.monotonic()
    while widget.runner.busy:
        app.processEvents()
        time.sleep(0.02)
        if time.monotonic() - start > timeout:
            widget.runner.cancel()
            raise TimeoutError(f"the job did not finish in {timeout} s")
    if widget.runner.last_error is not None:
        raise RuntimeError(f"the job failed: {widget.runner.last_error}")


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    # load torch (and its triton) before napari creates its OpenGL context
    from astrovl.clip import TINY_CLIP_CONFIG, CLIPEmbedder

    work = Path(tempfile.mkdtemp(prefix="astrovl-napari-shot-"))
    try:
        model, pretrained = args.clip_model, args.pretrained
        if model is None:
            model, pretrained = str(work / "tiny-clip"), ""
            CLIPEmbedder.from_config(TINY_CLIP_CONFIG, device="cpu", seed=0).save_pretrained(model)
        images = collect_images(work / "images")

        # napari settings of this run only: no pop-up notifications in the picture
        os.environ["NAPARI_CONFIG"] = str(work / "napari_settings.yaml")
        import napari
        from napari.settings import get_settings

        get_settings().application.gui_notification_level = "none"
        try:  # with a PyQt5 binding, napari 0.9 shows a toast about it at the first window
            import napari._qt.qt_main_window as qt_main_window

            qt_main_window.SHOW_QT_WARNING = False
        except (ImportError, AttributeError):
            pass
        from qtpy.QtWidgets import QApplication

        from astrovl_napari import SearchWidget
        from astrovl_napari._reader import read_fits

        viewer = napari.Viewer(title="astrovl", show=True)
        viewer.window.resize(*args.size)
        for data, kwargs, _ in read_fits(work / "images" / "ngc1316.fits"):
            viewer.add_image(data, **kwargs)
        widget = SearchWidget(viewer)
        viewer.window.add_dock_widget(widget, name="Search (astrovl)", area="right")
        app = QApplication.instance()
        widget.model.set_model(model, pretrained)
        widget.model.device_combo.value = args.device
        widget.image_folder.value = work / "images"
        widget.build_index()
        wait(widget, app, args.timeout)
        widget.query.value = args.query
        widget.k.value = min(4, len(images))
        widget.search_text()
        wait(widget, app, args.timeout)
        viewer.reset_view()
        for _ in range(20):
            app.processEvents()
            time.sleep(0.02)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        viewer.screenshot(str(args.output), canvas_only=False, flash=False)
        viewer.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
