"""Dock widget "Classify": zero-shot categories for an image region with a CLIP model."""

from __future__ import annotations

from typing import TYPE_CHECKING

try:
    from magicgui.widgets import Container, PushButton, RadioButtons, SpinBox, Table, TextEdit
except ImportError as exc:
    from astrovl.utils.imports import missing_dependency

    raise missing_dependency("magicgui", purpose="the napari widgets") from exc

from ._jobs import classify_job
from ._models import ModelRegistry, default_registry
from ._results import parse_categories, store_record
from ._widget_common import JobRunner, ModelPicker, RegionPicker, make_runner_widgets

if TYPE_CHECKING:  # pragma: no cover
    import napari

__all__ = ["ClassifyWidget", "CLASSIFICATION_KEY", "CATEGORY_SOURCES"]

#: key of ``layer.metadata["astrovl"]`` that holds classification records
CLASSIFICATION_KEY = "classification"
CATEGORY_SOURCES = ("Hubble categories (77)", "my list")
COLUMNS = ("rank", "category", "score", "probability")


class ClassifyWidget(Container):
    """Rank categories for the chosen region of an image layer (CLIP zero-shot).

    The default categories are :data:`astrovl.clip.HUBBLE_CATEGORIES`; "my list"
    takes one category per line. Results show as a ranked table and are appended
    to ``layer.metadata["astrovl"]["classification"]``.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
    registry : ModelRegistry, optional
    """

    def __init__(self, viewer: napari.viewer.Viewer, registry: ModelRegistry | None = None):
        self.viewer = viewer
        self.registry = registry or default_registry()
        self.model = ModelPicker("clip")
        self.region = RegionPicker(viewer)
        self.category_source = RadioButtons(label="categories", choices=CATEGORY_SOURCES,
                                            value=CATEGORY_SOURCES[0])
        self.categories = TextEdit(label="my categories", value="")
        self.categories.native.setPlaceholderText("one category per line")
        self.top_k = SpinBox(label="top k", value=5, min=1, max=100)
        self.classify_button = PushButton(text="Classify")
        self.table = Table(value=[], columns=list(COLUMNS), label="results")
        self.table.read_only = True
        self.status, self.progress_bar, self.cancel_button = make_runner_widgets()
        super().__init__(widgets=[
            self.model, self.region, self.category_source, self.categories, self.top_k,
            self.classify_button, self.table, self.progress_bar, self.status, self.cancel_button,
        ], labels=True)
        self.runner = JobRunner(self.status, self.progress_bar, self.cancel_button,
                                [self.classify_button])
        self.category_source.changed.connect(self._update_visibility)
        self.classify_button.changed.connect(self.classify)
        self._update_visibility()

    def _update_visibility(self, *_):
        self.categories.visible = self.category_source.value == CATEGORY_SOURCES[1]

    def chosen_categories(self) -> list[str] | None:
        """The user's categories, or None for the default Hubble list."""
        if self.category_source.value == CATEGORY_SOURCES[0]:
            return None
        return parse_categories(self.categories.native.toPlainText())

    def classify(self, *_):
        """Classify the chosen region (runs in a worker thread)."""
        desc = "Classify"
        try:
            categories = self.chosen_categories()
            request = self.region.request()
        except Exception as exc:
            self.runner.fail(exc, desc=desc)
            return None
        layer = self.region.layer
        return self.runner.start(
            classify_job, self.registry, self.model.spec, request, desc=desc,
            on_result=lambda record: self._on_result(layer, record),
            categories=categories, top_k=int(self.top_k.value),
        )

    def _on_result(self, layer, record: dict) -> None:
        store_record(layer.metadata, CLASSIFICATION_KEY, record)
        self.show_rows(record["rows"])

    def show_rows(self, rows: list[dict]) -> None:
        """Fill the table with ranked rows (scores rounded for display)."""
        data = [[r["rank"], r["category"], round(r["score"], 4), round(r.get("probability", float("nan")), 4)]
                for r in rows]
        self.table.value = {"data": data, "index": list(range(len(data))), "columns": list(COLUMNS)}

    @property
    def rows(self) -> list[dict]:
        """The rows shown in the results table."""
        return self.table.to_dict("records")
