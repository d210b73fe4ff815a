"""Dock widget "Search": search an embedding index by text or by an image region."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

try:
    from magicgui.widgets import Container, FileEdit, Label, LineEdit, PushButton, SpinBox
except ImportError as exc:
    from astrovl.utils.imports import missing_dependency

    raise missing_dependency("magicgui", purpose="the napari widgets") from exc

from ._jobs import build_index_job, find_images, open_index_job, search_job
from ._models import ModelRegistry, default_registry
from ._reader import image_layer_data
from ._results import SearchHit
from ._widget_common import JobRunner, ModelPicker, RegionPicker, make_runner_widgets

if TYPE_CHECKING:  # pragma: no cover
    import napari

__all__ = ["SearchWidget"]

THUMBNAIL_SIZE = 72


def _pixmap(rgb: np.ndarray):
    from qtpy.QtGui import QImage, QPixmap

    arr = np.ascontiguousarray(rgb[..., :3], dtype=np.uint8)
    h, w = arr.shape[:2]
    qimg = QImage(arr.data, w, h, 3 * w, QImage.Format.Format_RGB888)
    return QPixmap.fromImage(qimg.copy())


def confirm_open_outside_root(parent, path: Path, root: Path | None) -> bool:
    """Ask the user whether to open ``path``, which lies outside the index's image root.

    Returns True only when the user answers Yes (the default button is No).
    """
    from qtpy.QtWidgets import QMessageBox

    where = f"outside the index's image folder ({root})" if root is not None else \
        "but the index records no image folder"
    answer = QMessageBox.question(
        parent, "Open a file named by the index?",
        f"The index names the file\n{path}\n{where}.\n\nAn index from someone else can name any "
        "file on this computer. Open it?",
        QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No, QMessageBox.StandardButton.No)
    return answer == QMessageBox.StandardButton.Yes


def _path_or_none(value) -> Path | None:
    if value is None:
        return None
    text = str(value).strip()
    if text in ("", "."):
        return None
    return Path(text).expanduser()


class SearchWidget(Container):
    """Open or build an :class:`~astrovl.EmbeddingIndex` and search it by text or by a region.

    Results show ranked with thumbnails and cosine scores; double-click a result
    (or select it and press "Open selected") to open the image as layers. Files
    named by the index are opened (thumbnails included) only under the image
    folder the index records; any other file is opened only after the user
    confirms. "save index to" must be a new or empty folder, or an earlier
    index: a folder holding other files is refused, never replaced.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
    registry : ModelRegistry, optional
    """

    def __init__(self, viewer: napari.viewer.Viewer, registry: ModelRegistry | None = None):
        from qtpy.QtCore import QSize
        from qtpy.QtWidgets import QAbstractItemView, QListWidget

        self.viewer = viewer
        self.registry = registry or default_registry()
        self.index = None
        self.index_dir: Path | None = None
        self.hits: list[SearchHit] = []
        self.model = ModelPicker("clip")
        self.index_path = FileEdit(label="index folder", mode="d", nullable=True, value=None)
        self.open_button = PushButton(text="Open index")
        self.image_folder = FileEdit(label="image folder", mode="d", nullable=True, value=None)
        self.save_to = FileEdit(label="save index to", mode="d", nullable=True, value=None,
                                tooltip="optional: a new or empty folder for the index built (a folder "
                                "holding other files is refused, never replaced)")
        self.build_button = PushButton(text="Build index")
        self.index_info = Label(value="no index open")
        self.query = LineEdit(label="text query", value="")
        self.k = SpinBox(label="results", value=10, min=1, max=200)
        self.search_text_button = PushButton(text="Search text")
        self.region = RegionPicker(viewer)
        self.search_layer_button = PushButton(text="Search with region")
        self.open_result_button = PushButton(text="Open selected")
        self.status, self.progress_bar, self.cancel_button = make_runner_widgets()
        super().__init__(widgets=[
            self.model, self.index_path, self.open_button, self.image_folder, self.save_to,
            self.build_button, self.index_info, self.query, self.k, self.search_text_button,
            self.region, self.search_layer_button,
        ], labels=True)
        self.results = QListWidget()
        self.results.setIconSize(QSize(THUMBNAIL_SIZE, THUMBNAIL_SIZE))
        self.results.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.results.setMinimumHeight(3 * THUMBNAIL_SIZE)
        self.native.layout().addWidget(self.results)
        for w in (self.open_result_button, self.progress_bar, self.status, self.cancel_button):
            self.append(w)
        self.runner = JobRunner(self.status, self.progress_bar, self.cancel_button,
                                [self.open_button, self.build_button, self.search_text_button,
                                 self.search_layer_button])
        self.open_button.changed.connect(self.open_index)
        self.build_button.changed.connect(self.build_index)
        self.search_text_button.changed.connect(self.search_text)
        self.query.native.returnPressed.connect(self.search_text)
        self.search_layer_button.changed.connect(self.search_region)
        self.open_result_button.changed.connect(self.open_selected)
        self.results.itemDoubleClicked.connect(lambda item: self.open_result(self.results.row(item)))

    # ---------------------------------------------------------------- index
    def open_index(self, *_):
        """Load the index folder with the chosen CLIP model (in a worker thread)."""
        desc = "Open index"
        folder = _path_or_none(self.index_path.value)
        if folder is None:
            self.runner.fail(ValueError("choose the index folder first"), desc=desc)
            return None
        return self.runner.start(open_index_job, self.registry, self.model.spec, folder, desc=desc,
                                 on_result=lambda index: self._set_index(index, folder))

    def build_index(self, *_):
        """Embed every image under the image folder and index them (progress bar, cancellable)."""
        desc = "Build index"
        folder = _path_or_none(self.image_folder.value)
        try:
            if folder is None:
                raise ValueError("choose the folder of images to index first")
            paths = find_images(folder)
            if not paths:
                raise ValueError(f"{str(folder)!r} holds no FITS or picture files")
        except Exception as exc:
            self.runner.fail(exc, desc=desc)
            return None
        save_to = _path_or_none(self.save_to.value)
        return self.runner.start(build_index_job, self.registry, self.model.spec, paths,
                                 save_to=save_to, image_root=folder, desc=desc, on_result=self._on_built)

    def _on_built(self, result) -> None:
        self._set_index(result.index, result.saved_to)
        if result.skipped:
            from napari.utils.notifications import show_warning

            names = ", ".join(p.name for p, _ in result.skipped[:5])
            show_warning(f"Build index: skipped {len(result.skipped)} unreadable files ({names})")

    def _set_index(self, index, directory: Path | None) -> None:
        self.index = index
        self.index_dir = Path(directory) if directory is not None else None
        where = f" in {self.index_dir}" if self.index_dir is not None else " (not saved)"
        self.index_info.value = f"{len(index)} images{where}"
        self.clear_results()

    # ---------------------------------------------------------------- search
    def _check_index(self, desc: str) -> bool:
        if self.index is None:
            self.runner.fail(ValueError("no index: open an index folder or build one first"), desc=desc)
            return False
        return True

    def search_text(self, *_):
        """Search the index for the text query."""
        desc = "Search"
        if not self._check_index(desc):
            return None
        text = self.query.value.strip()
        if not text:
            self.runner.fail(ValueError("the text query is empty; type what to look for"), desc=desc)
            return None
        return self.runner.start(search_job, self.index, text, desc=desc, on_result=self.show_hits,
                                 k=int(self.k.value), thumbnail_size=THUMBNAIL_SIZE,
                                 index_dir=self.index_dir)

    def search_region(self, *_):
        """Search the index with the chosen region of an image layer."""
        desc = "Search"
        if not self._check_index(desc):
            return None
        try:
            request = self.region.request()
        except Exception as exc:
            self.runner.fail(exc, desc=desc)
            return None
        return self.runner.start(search_job, self.index, request, desc=desc, on_result=self.show_hits,
                                 k=int(self.k.value), thumbnail_size=THUMBNAIL_SIZE,
                                 index_dir=self.index_dir)

    # ---------------------------------------------------------------- results
    def clear_results(self) -> None:
        self.hits = []
        self.results.clear()

    def show_hits(self, hits: list[SearchHit]) -> None:
        """List the hits (thumbnail, rank, score, name)."""
        from qtpy.QtGui import QIcon
        from qtpy.QtWidgets import QListWidgetItem

        self.clear_results()
        self.hits = list(hits)
        for hit in self.hits:
            item = QListWidgetItem(hit.text())
            tip = str(hit.path) if hit.path is not None else "image file not found"
            if hit.path is not None and not hit.in_root:
                tip += " (outside the index's image folder: opened only after you confirm)"
            item.setToolTip(tip)
            if hit.thumbnail is not None:
                item.setIcon(QIcon(_pixmap(hit.thumbnail)))
            self.results.addItem(item)
        if self.hits:
            self.results.setCurrentRow(0)

    def open_selected(self, *_):
        """Open the selected result as layers."""
        row = self.results.currentRow()
        if row < 0:
            self.runner.fail(ValueError("select a result first"), desc="Open result")
            return []
        return self.open_result(row)

    def open_result(self, row: int) -> list:
        """Open result ``row`` (0-based) as layers; returns the new layers."""
        try:
            hit = self.hits[row]
            if hit.path is None:
                raise FileNotFoundError(
                    f"result {hit.rank} ({hit.label}) names no image file that exists here; "
                    "the index metadata should hold paths to the images"
                )
            if not hit.in_root:
                from astrovl.clip.index import recorded_image_root

                root = recorded_image_root(self.index, self.index_dir) if self.index is not None else None
                if not confirm_open_outside_root(self.native, hit.path, root):
                    return []
            layers = [self.viewer.add_image(data, **kwargs) for data, kwargs, _ in image_layer_data(hit.path)]
        except Exception as exc:
            self.runner.fail(exc, desc="Open result")
            return []
        for layer in layers:
            layer.metadata.setdefault("astrovl", {})["search_hit"] = {
                "rank": hit.rank, "score": hit.score, "row": hit.row}
        return layers
