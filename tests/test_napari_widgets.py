"""The plugin in a real napari viewer (pytest-qt; headless under Xvfb through pytest-xvfb)."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")
# Load triton (through torch._dynamo) now, before napari creates an OpenGL context: Mesa's LLVM
# and triton's LLVM crash when triton loads second. In a user session the plugin's guard
# (astrovl_napari._compat.avoid_llvm_clash, tested below in a subprocess) handles this instead.
pytest.importorskip("torchvision.ops")

from astrovl_napari import ModelRegistry  # noqa: E402
from astrovl_napari._models import ModelSpec, load_model  # noqa: E402
from astrovl_napari._widget_common import viewer_camera  # noqa: E402

MANIFEST = Path(__file__).parent.parent / "astrovl_napari" / "napari.yaml"
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def astrovl_plugin():
    """Make sure npe2 knows the plugin (it is discovered by entry point when installed)."""
    import npe2

    pm = npe2.PluginManager.instance()
    try:
        pm.get_manifest("astrovl")
    except KeyError:
        pm.register(npe2.PluginManifest.from_file(MANIFEST))
    return "astrovl"


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from astrovl.clip import TINY_CLIP_CONFIG, CLIPEmbedder

    path = tmp_path_factory.mktemp("clip") / "tiny-clip"
    CLIPEmbedder.from_config(TINY_CLIP_CONFIG, device="cpu", seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_llava_dir(tmp_path_factory):
    testing = pytest.importorskip("astrovl.testing.llava")
    return testing.make_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny-llava")


@pytest.fixture
def image_folder(tmp_path, m13_path, ngc1316_path, xdf_array):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(m13_path, folder / "m13.fits")
    shutil.copy(ngc1316_path, folder / "ngc1316.fits")
    Image.fromarray(xdf_array[::4, ::4]).save(folder / "xdf.png")
    return folder


def wait_done(qtbot, widget):
    qtbot.waitUntil(lambda: not widget.runner.busy, timeout=TIMEOUT_MS)


def use_model(widget, directory):
    widget.model.set_model(str(directory), "")
    widget.model.device_combo.value = "cpu"


def last_error_message() -> str:
    from napari.utils.notifications import NotificationSeverity, notification_manager

    errors = [n for n in notification_manager.records if n.severity == NotificationSeverity.ERROR]
    return str(errors[-1].message) if errors else ""


def test_reader_opens_fits_through_napari(make_napari_viewer, astrovl_plugin, m13_path,
                                          ngc1316_path):
    viewer = make_napari_viewer()
    (m13,) = viewer.open(m13_path, plugin=astrovl_plugin)
    (ngc,) = viewer.open(ngc1316_path, plugin=astrovl_plugin)
    assert m13.name == "m13" and ngc.name == "comp"
    assert m13.metadata["wcs"].has_celestial and m13.data.shape == (300, 300)
    assert tuple(m13.scale) == (-1.0, 1.0)
    # row 0 (FITS y = 1) is drawn at the bottom: the largest world y
    assert m13.data_to_world((0, 0))[0] > m13.data_to_world((299, 0))[0]
    lo, hi = m13.contrast_limits
    assert lo < hi and lo >= np.nanmin(m13.data) and hi <= np.nanmax(m13.data)


def test_classify_widget_end_to_end(make_napari_viewer, qtbot, astrovl_plugin, m13_path,
                                    tiny_clip_dir):
    from astrovl.clip import HUBBLE_CATEGORIES

    viewer = make_napari_viewer()
    (layer,) = viewer.open(m13_path, plugin=astrovl_plugin)
    _, widget = viewer.window.add_plugin_dock_widget(astrovl_plugin, "Classify")
    assert widget.region.layer is layer  # follows the active layer
    use_model(widget, tiny_clip_dir)
    widget.top_k.value = 4
    widget.classify()
    wait_done(qtbot, widget)
    assert widget.runner.last_error is None, widget.runner.last_error
    rows = widget.rows
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    assert all(r["category"] in HUBBLE_CATEGORIES for r in rows)
    stored = layer.metadata["astrovl"]["classification"]
    assert len(stored) == 1 and stored[0]["rows"][0]["category"] == rows[0]["category"]
    assert widget.status.value == "Classify: done"

    widget.category_source.value = "my list"
    widget.categories.native.setPlainText("globular cluster\nbarred spiral galaxy")
    widget.classify()
    wait_done(qtbot, widget)
    assert sorted(r["category"] for r in widget.rows) == ["barred spiral galaxy", "globular cluster"]
    assert len(layer.metadata["astrovl"]["classification"]) == 2


def test_search_widget_build_query_open(make_napari_viewer, qtbot, astrovl_plugin, tmp_path,
                                        image_folder, tiny_clip_dir, m13_path):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(astrovl_plugin, "Search")
    use_model(widget, tiny_clip_dir)
    widget.image_folder.value = image_folder
    widget.save_to.value = tmp_path / "index"
    widget.build_index()
    assert widget.runner.busy and not widget.progress_bar.native.isHidden()
    wait_done(qtbot, widget)
    assert widget.progress_bar.native.isHidden()
    assert widget.runner.last_error is None, widget.runner.last_error
    assert len(widget.index) == 3 and widget.index_info.value.startswith("3 images")
    assert (tmp_path / "index" / "index.json").is_file()

    widget.query.value = "a dense globular cluster"
    widget.k.value = 2
    widget.search_text()
    wait_done(qtbot, widget)
    assert widget.results.count() == 2 and len(widget.hits) == 2
    assert all(not widget.results.item(i).icon().isNull() for i in range(2))
    assert widget.results.item(0).text().startswith("1.  ")

    # open the index again from disk, then query with the M13 layer itself
    widget.index = None
    widget.index_path.value = tmp_path / "index"
    widget.open_index()
    wait_done(qtbot, widget)
    assert len(widget.index) == 3
    (layer,) = viewer.open(m13_path, plugin=astrovl_plugin)
    widget.region.layer_combo.value = layer
    widget.k.value = 3
    widget.search_region()
    wait_done(qtbot, widget)
    assert widget.hits[0].label == "m13.fits" and widget.hits[0].score > 0.999

    # choosing a result opens it as a layer
    widget.results.setCurrentRow(1)
    new_layers = widget.open_selected()
    assert len(new_layers) == 1 and new_layers[0] in viewer.layers
    assert new_layers[0].metadata["astrovl"]["search_hit"]["rank"] == 2


def test_caption_widget_regions_and_answers(make_napari_viewer, qtbot, astrovl_plugin, m13_path,
                                            tiny_llava_dir):
    viewer = make_napari_viewer()
    (layer,) = viewer.open(m13_path, plugin=astrovl_plugin)
    _, widget = viewer.window.add_plugin_dock_widget(astrovl_plugin, "Caption & Ask")
    use_model(widget, tiny_llava_dir)
    widget.max_new_tokens.value = 6
    widget.caption()
    wait_done(qtbot, widget)
    assert widget.runner.last_error is None, widget.runner.last_error
    answers = layer.metadata["astrovl"]["answers"]
    assert answers[0]["kind"] == "caption" and answers[0]["bbox"] == [0, 300, 0, 300]
    assert widget.answers_text.startswith("Caption m13[0:300, 0:300]:")

    # a question about the current field of view
    viewer.reset_view()
    camera = viewer_camera(viewer)
    camera.zoom = camera.zoom * 4
    widget.region.mode_combo.value = "field of view"
    widget.question.value = "What kind of object is this?"
    widget.ask()
    wait_done(qtbot, widget)
    assert widget.runner.last_error is None, widget.runner.last_error
    rec = layer.metadata["astrovl"]["answers"][-1]
    y0, y1, x0, x1 = rec["bbox"]
    assert rec["kind"] == "question" and rec["question"] == "What kind of object is this?"
    assert 0 < y1 - y0 < 300 and 0 < x1 - x0 < 300  # zoomed in: a part of the image
    assert "Q m13[" in widget.answers_text and widget.question.value == ""

    # a rectangle drawn on a shapes layer
    shapes = viewer.add_shapes([np.array([[-100, 20], [-100, 60], [-60, 60], [-60, 20]], float)],
                               shape_type="rectangle")
    widget.region.mode_combo.value = "shapes rectangle"
    assert widget.region.shapes_combo.value is shapes
    widget.region.layer_combo.value = layer
    widget.caption()
    wait_done(qtbot, widget)
    assert layer.metadata["astrovl"]["answers"][-1]["bbox"] == [60, 101, 20, 61]
    assert len(layer.metadata["astrovl"]["answers"]) == 3


def test_errors_become_notifications(make_napari_viewer, qtbot, astrovl_plugin, m13_path,
                                     tmp_path):
    from astrovl.exceptions import ModelNotFoundError
    from astrovl_napari import ClassifyWidget

    viewer = make_napari_viewer()
    widget = ClassifyWidget(viewer, registry=ModelRegistry())
    viewer.window.add_dock_widget(widget, name="Classify")
    widget.classify()  # no image layer
    assert not widget.runner.busy
    assert "no image layer" in widget.status.value
    assert "Classify failed: no image layer" in last_error_message()

    viewer.open(m13_path, plugin=astrovl_plugin)
    widget.model.set_model(str(tmp_path / "no-such-model"), "")
    widget.model.device_combo.value = "cpu"
    widget.classify()  # fails in the worker thread
    wait_done(qtbot, widget)
    assert isinstance(widget.runner.last_error, ModelNotFoundError)
    assert widget.status.value.startswith("Classify failed:")
    assert "no-such-model" in last_error_message()
    assert widget.classify_button.enabled and not widget.cancel_button.enabled

    widget.category_source.value = "my list"
    widget.categories.native.setPlainText("  ")
    widget.classify()
    assert "category list is empty" in last_error_message()
    assert len(viewer.layers) == 1  # the viewer is still there


def test_cancel_stops_a_job(make_napari_viewer, qtbot, astrovl_plugin, image_folder, tiny_clip_dir):
    from astrovl_napari import SearchWidget

    release = threading.Event()
    entered = threading.Event()

    def slow_loader(spec: ModelSpec):
        entered.set()
        release.wait(30)
        return load_model(spec)

    viewer = make_napari_viewer()
    widget = SearchWidget(viewer, registry=ModelRegistry(loader=slow_loader))
    viewer.window.add_dock_widget(widget, name="Search")
    use_model(widget, tiny_clip_dir)
    widget.image_folder.value = image_folder
    widget.build_index()
    assert widget.runner.busy and widget.cancel_button.enabled
    assert not widget.build_button.enabled
    qtbot.waitUntil(entered.is_set, timeout=TIMEOUT_MS)
    widget.cancel_button.clicked.emit()
    release.set()
    wait_done(qtbot, widget)
    assert widget.runner.cancelled and widget.status.value == "Build index: cancelled"
    assert widget.index is None and widget.runner.last_result is None
    assert widget.build_button.enabled


def test_screenshot_with_docked_widget_and_results(make_napari_viewer, qtbot, astrovl_plugin,
                                                   ngc1316_path, tiny_clip_dir):
    viewer = make_napari_viewer(show=True)
    viewer.open(ngc1316_path, plugin=astrovl_plugin)
    _, widget = viewer.window.add_plugin_dock_widget(astrovl_plugin, "Classify")
    use_model(widget, tiny_clip_dir)
    widget.classify()
    wait_done(qtbot, widget)
    assert len(widget.rows) == 5
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=False, flash=False)
    assert shot.ndim == 3 and shot.shape[2] == 4 and shot.shape[0] > 200 and shot.shape[1] > 400
    rgb = shot[..., :3].reshape(-1, 3)
    assert len(np.unique(rgb, axis=0)) > 200  # an image, widgets and text: many colours
    canvas = viewer.screenshot(canvas_only=True, flash=False)[..., :3]
    assert canvas.std() > 10  # the galaxy was rendered
    dock_width = widget.native.width()
    assert dock_width > 100
    dock = shot[:, -dock_width:, :3]
    assert dock.std() > 5  # the dock (text, table) is not blank


GUARD_SCRIPT = """
import sys
import napari
viewer = napari.Viewer(show=False)
viewer.close()
assert any("libLLVM" in line for line in open("/proc/self/maps")), "no system LLVM loaded"
from astrovl_napari import ModelRegistry, ModelSpec
embedder = ModelRegistry().get(ModelSpec("clip", sys.argv[1], device="cpu"))
print("ok", sys.modules["triton"] is None, embedder.embed_text(["a galaxy"]).shape)
"""


def test_models_load_after_the_viewer_rendered(tmp_path, tiny_clip_dir):
    """In a fresh process, torch loads after napari's OpenGL context without crashing."""
    import os
    import subprocess
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("the Mesa LLVM clash is specific to Linux")
    script = tmp_path / "guard.py"
    script.write_text(GUARD_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("ASTROVL_ALLOW_TRITON", None)
    out = subprocess.run([sys.executable, str(script), str(tiny_clip_dir)], capture_output=True,
                         text=True, env=env, timeout=300)
    if "no system LLVM loaded" in out.stderr:
        pytest.skip("the OpenGL driver here does not load the system LLVM")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "ok True (1, 64)"


def test_search_widget_asks_before_opening_a_file_outside_the_image_root(
        make_napari_viewer, tmp_path, image_folder, m13_path, monkeypatch):
    """An index from someone else can name any file: those outside its image root need a yes."""
    from astrovl.clip import EmbeddingIndex
    from astrovl_napari import SearchWidget, _search_widget
    from astrovl_napari._results import SearchHit

    outside = tmp_path / "elsewhere" / "private.fits"
    outside.parent.mkdir()
    shutil.copy(m13_path, outside)
    viewer = make_napari_viewer()
    widget = SearchWidget(viewer, registry=ModelRegistry())
    widget.index = EmbeddingIndex(4, image_root=image_folder)
    widget.hits = [SearchHit(rank=1, score=0.9, row=0, label="inside", path=image_folder / "m13.fits",
                             in_root=True),
                   SearchHit(rank=2, score=0.8, row=1, label="outside", path=outside, in_root=False)]
    asked = []

    def answer(value):
        def confirm(parent, path, root):
            asked.append((Path(path), root))
            return value
        return confirm

    monkeypatch.setattr(_search_widget, "confirm_open_outside_root", answer(False))
    assert len(widget.open_result(0)) == 1 and asked == []  # inside the root: no question
    assert widget.open_result(1) == [] and len(viewer.layers) == 1  # the user said no
    assert asked == [(outside, image_folder.resolve())]
    monkeypatch.setattr(_search_widget, "confirm_open_outside_root", answer(True))
    layers = widget.open_result(1)
    assert len(layers) == 1 and len(viewer.layers) == 2 and len(asked) == 2


def test_search_widget_save_to_refuses_a_folder_with_files(make_napari_viewer, qtbot, astrovl_plugin,
                                                           tmp_path, image_folder, tiny_clip_dir):
    """The "save index to" picker offers existing folders: one holding files is never replaced."""
    from astrovl.exceptions import OutputDirectoryError

    before = {p.name: p.read_bytes() for p in image_folder.iterdir()}
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(astrovl_plugin, "Search")
    use_model(widget, tiny_clip_dir)
    widget.image_folder.value = image_folder
    widget.save_to.value = image_folder  # the folder of the images themselves
    widget.build_index()
    wait_done(qtbot, widget)
    assert isinstance(widget.runner.last_error, OutputDirectoryError)
    assert str(image_folder) in last_error_message() and "not empty" in last_error_message()
    assert {p.name: p.read_bytes() for p in image_folder.iterdir()} == before
    assert widget.index is None
