"""Dock widget "Caption & Ask": describe an image region and answer questions with AstroLLaVA."""

from __future__ import annotations

from typing import TYPE_CHECKING

try:
    from magicgui.widgets import Container, LineEdit, PushButton, SpinBox, TextEdit
except ImportError as exc:
    from astrovl.utils.imports import missing_dependency

    raise missing_dependency("magicgui", purpose="the napari widgets") from exc

from ._jobs import caption_job
from ._models import ModelRegistry, default_registry
from ._results import format_conversation, records_of, store_record
from ._widget_common import JobRunner, ModelPicker, RegionPicker, make_runner_widgets

if TYPE_CHECKING:  # pragma: no cover
    import napari

__all__ = ["CaptionWidget", "ANSWERS_KEY"]

#: key of ``layer.metadata["astrovl"]`` that holds captions and answers
ANSWERS_KEY = "answers"


class CaptionWidget(Container):
    """Caption the chosen image layer (or the field of view, or a shapes rectangle) and ask questions.

    Answers appear in the widget and are appended to
    ``layer.metadata["astrovl"]["answers"]`` as dicts (``kind``, ``question``,
    ``answer``, ``model``, ``region``, ``bbox``, ``time``).

    Parameters
    ----------
    viewer : napari.viewer.Viewer
    registry : ModelRegistry, optional
        Where models are loaded and shared (default: the plugin-wide registry).
    """

    def __init__(self, viewer: napari.viewer.Viewer, registry: ModelRegistry | None = None):
        self.viewer = viewer
        self.registry = registry or default_registry()
        self.model = ModelPicker("llava")
        self.region = RegionPicker(viewer)
        self.max_new_tokens = SpinBox(label="max new tokens", value=200, min=1, max=4096)
        self.prompt = LineEdit(label="caption prompt", value="",
                               tooltip="optional instruction; empty uses the model's default prompt")
        self.caption_button = PushButton(text="Caption")
        self.question = LineEdit(label="question", value="")
        self.ask_button = PushButton(text="Ask")
        self.output = TextEdit(label="answers", value="")
        self.output.native.setReadOnly(True)
        self.output.native.setMinimumHeight(140)
        self.status, self.progress_bar, self.cancel_button = make_runner_widgets()
        super().__init__(widgets=[
            self.model, self.region, self.max_new_tokens, self.prompt, self.caption_button,
            self.question, self.ask_button, self.output, self.progress_bar, self.status,
            self.cancel_button,
        ], labels=True)
        self.runner = JobRunner(self.status, self.progress_bar, self.cancel_button,
                                [self.caption_button, self.ask_button])
        self.caption_button.changed.connect(self.caption)
        self.ask_button.changed.connect(self.ask)
        self.question.native.returnPressed.connect(self.ask)
        self.region.layer_combo.changed.connect(self._show_history)
        self._show_history()

    # ---------------------------------------------------------------- actions
    def caption(self, *_):
        """Caption the chosen region (runs in a worker thread)."""
        return self._run(question=None)

    def ask(self, *_):
        """Ask the question typed in the widget about the chosen region."""
        text = self.question.value.strip()
        if not text:
            self.runner.fail(ValueError("the question is empty; type a question first"), desc="Ask")
            return None
        return self._run(question=text)

    def _run(self, question: str | None):
        desc = "Caption" if question is None else "Ask"
        try:
            request = self.region.request()
        except Exception as exc:
            self.runner.fail(exc, desc=desc)
            return None
        layer = self.region.layer
        return self.runner.start(
            caption_job, self.registry, self.model.spec, request, desc=desc,
            on_result=lambda record: self._on_answer(layer, record),
            question=question, prompt=self.prompt.value.strip() or None,
            max_new_tokens=int(self.max_new_tokens.value),
        )

    def _on_answer(self, layer, record: dict) -> None:
        store_record(layer.metadata, ANSWERS_KEY, record)
        if record["kind"] == "question":
            self.question.value = ""
        if self.region.layer is layer:
            self._show_history()

    def _show_history(self, *_):
        layer = self.region.layer
        records = records_of(layer.metadata, ANSWERS_KEY) if layer is not None else []
        self.output.native.setPlainText(format_conversation(records))
        bar = self.output.native.verticalScrollBar()
        bar.setValue(bar.maximum())

    @property
    def answers_text(self) -> str:
        """The text shown in the answers box."""
        return self.output.native.toPlainText()
