"""Pieces shared by the dock widgets: model picker, region picker and the job runner."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

try:
    from magicgui.widgets import ComboBox, Container, Label, LineEdit, ProgressBar, PushButton
except ImportError as exc:
    from astrovl.utils.imports import missing_dependency

    raise missing_dependency("magicgui", purpose="the napari widgets") from exc

from ._models import ModelSpec
from ._regions import REGION_MODES, RegionRequest, region_request

if TYPE_CHECKING:  # pragma: no cover
    import napari

__all__ = ["ModelPicker", "RegionPicker", "JobRunner", "DEVICES", "viewer_camera", "canvas_size"]

log = logging.getLogger(__name__)

#: device choices offered (any torch device string can be typed in)
DEVICES = ("auto", "cpu", "cuda", "mps")


class ModelPicker(Container):
    """Model name or local directory, (CLIP) pretrained tag, and device.

    Parameters
    ----------
    kind : {"clip", "llava"}
    """

    def __init__(self, kind: str, *, name: str = "", pretrained: str = ""):
        from astrovl import conf

        self.kind = kind
        default = conf.clip_model if kind == "clip" else conf.llava_model
        self.name_edit = LineEdit(label="model", value=name or default,
                                  tooltip="model name (hub id / open_clip name) or local directory")
        self.browse_button = PushButton(text="Choose folder…")
        widgets: list = [self.name_edit, self.browse_button]
        self.pretrained_edit = None
        if kind == "clip":
            self.pretrained_edit = LineEdit(
                label="pretrained", value=pretrained if (name or pretrained) else conf.clip_pretrained,
                tooltip="open_clip pretrained tag or weights file; leave empty for a saved directory")
            widgets.append(self.pretrained_edit)
        self.device_combo = ComboBox(label="device", choices=DEVICES, value="auto")
        widgets.append(self.device_combo)
        super().__init__(widgets=widgets, labels=True)
        self.margins = (0, 0, 0, 0)
        self.browse_button.changed.connect(self._browse)

    def _browse(self, *_):
        from qtpy.QtWidgets import QFileDialog

        folder = QFileDialog.getExistingDirectory(self.native, "Choose a model folder")
        if folder:
            self.set_model(folder)

    def set_model(self, name: str, pretrained: str = "") -> None:
        """Set the model name (or directory) and the pretrained tag."""
        self.name_edit.value = str(name)
        if self.pretrained_edit is not None:
            self.pretrained_edit.value = pretrained

    @property
    def spec(self) -> ModelSpec:
        """The :class:`~astrovl_napari.ModelSpec` currently chosen."""
        pretrained = self.pretrained_edit.value if self.pretrained_edit is not None else None
        return ModelSpec(self.kind, self.name_edit.value, pretrained or None,
                         str(self.device_combo.value))


def viewer_camera(viewer):
    """The 2-D/3-D camera model (``viewer.scene.camera`` in napari >= 0.9, else ``viewer.camera``)."""
    scene = getattr(viewer, "scene", None)
    camera = getattr(scene, "camera", None)
    return camera if camera is not None else viewer.camera


def canvas_size(viewer) -> tuple[int, int]:
    """Canvas ``(height, width)`` in screen pixels."""
    canvas = getattr(viewer, "canvas", None)
    size = getattr(canvas, "size", None)
    if size is None:  # napari < 0.9
        size = viewer._canvas_size
    return int(size[0]), int(size[1])


def _image_layer_choices(viewer) -> Callable:
    def choices(_widget=None):
        from napari.layers import Image

        return [(layer.name, layer) for layer in viewer.layers if isinstance(layer, Image)]

    return choices


def _shapes_layer_choices(viewer) -> Callable:
    def choices(_widget=None):
        from napari.layers import Shapes

        return [(layer.name, layer) for layer in viewer.layers if isinstance(layer, Shapes)]

    return choices


class RegionPicker(Container):
    """Image layer, region mode (whole layer / field of view / shapes rectangle) and shapes layer.

    The image layer follows the viewer's active layer when that is an image.
    """

    def __init__(self, viewer: napari.viewer.Viewer):
        self.viewer = viewer
        self.layer_combo = ComboBox(label="image layer", choices=_image_layer_choices(viewer),
                                    nullable=True)
        self.mode_combo = ComboBox(label="region", choices=REGION_MODES, value=REGION_MODES[0])
        self.shapes_combo = ComboBox(label="shapes layer", choices=_shapes_layer_choices(viewer),
                                     nullable=True)
        super().__init__(widgets=[self.layer_combo, self.mode_combo, self.shapes_combo], labels=True)
        self.margins = (0, 0, 0, 0)
        self.mode_combo.changed.connect(self._update_visibility)
        viewer.layers.events.inserted.connect(self._on_layers_changed)
        viewer.layers.events.removed.connect(self._on_layers_changed)
        viewer.layers.events.reordered.connect(self._on_layers_changed)
        viewer.layers.selection.events.active.connect(self._on_active)
        for layer in viewer.layers:
            layer.events.name.connect(self._on_layers_changed)
        self._on_layers_changed()
        self._on_active()
        self._update_visibility()

    def _on_layers_changed(self, event=None):
        if event is not None and getattr(event, "type", "") == "inserted":
            event.value.events.name.connect(self._on_layers_changed)
        self.layer_combo.reset_choices()
        self.shapes_combo.reset_choices()
        if self.layer_combo.value is None and len(self.layer_combo.choices) > 1:
            self.layer_combo.value = self.layer_combo.choices[-1]
        if self.shapes_combo.value is None and len(self.shapes_combo.choices) > 1:
            self.shapes_combo.value = self.shapes_combo.choices[-1]

    def _on_active(self, event=None):
        from napari.layers import Image, Shapes

        active = self.viewer.layers.selection.active
        if isinstance(active, Image) and active in self.layer_combo.choices:
            self.layer_combo.value = active
        elif isinstance(active, Shapes) and active in self.shapes_combo.choices:
            self.shapes_combo.value = active

    def _update_visibility(self, *_):
        self.shapes_combo.visible = self.mode_combo.value == "shapes rectangle"

    @property
    def layer(self):
        """The chosen image layer (or None)."""
        return self.layer_combo.value

    def request(self) -> RegionRequest:
        """Read the viewer state (main thread) and describe the pixels to use.

        Raises
        ------
        ValueError
            No image layer, empty shapes layer, region off the image...
        """
        layer = self.layer_combo.value
        if layer is None:
            raise ValueError("no image layer: open an image (File > Open) and choose it above")
        viewer = self.viewer
        camera = viewer_camera(viewer)
        orientation = getattr(camera, "orientation2d", ("down", "right"))
        return region_request(
            layer, str(self.mode_combo.value),
            world_point=viewer.dims.point,
            center=camera.center,
            zoom=camera.zoom,
            canvas_size=canvas_size(viewer),
            shapes_layer=self.shapes_combo.value,
            camera_vertical=str(getattr(orientation[0], "value", orientation[0])),
        )


class JobRunner:
    """Run job generators in a napari thread worker with progress, cancel and error reporting.

    One job at a time. Errors become napari error notifications (and the status
    line); they never propagate into the viewer.

    Parameters
    ----------
    status : magicgui.widgets.Label
    progress_bar : magicgui.widgets.ProgressBar
    cancel_button : magicgui.widgets.PushButton
    action_buttons : list of magicgui widgets
        Disabled while a job runs.
    """

    def __init__(self, status: Label, progress_bar: ProgressBar, cancel_button: PushButton,
                 action_buttons: list):
        self.status = status
        self.progress_bar = progress_bar
        self.cancel_button = cancel_button
        self.action_buttons = action_buttons
        self.worker = None
        self.last_error: BaseException | None = None
        self.last_result: Any = None
        self.cancelled = False
        self._pbar = None
        self._desc = ""
        self._alive = True
        cancel_button.enabled = False
        progress_bar.visible = False
        cancel_button.changed.connect(self.cancel)
        status.native.destroyed.connect(self._on_destroyed)

    def _on_destroyed(self, *_):
        """The widget is gone: stop the job and ignore its remaining signals."""
        self._alive = False
        if self.worker is not None:
            self.worker.quit()
        pbar, self._pbar = self._pbar, None
        if pbar is not None:
            pbar.close()

    @property
    def busy(self) -> bool:
        """True while a job runs."""
        return self.worker is not None

    def start(self, job: Callable, *args, desc: str, on_result: Callable[[Any], None],
              **kwargs) -> Any:
        """Start ``job(*args, **kwargs)`` (a generator of :class:`~astrovl_napari._jobs.Step`)."""
        from napari.qt.threading import create_worker
        from napari.utils import progress

        if self.busy:
            self.fail(RuntimeError(f"{self._desc} is still running; wait for it or cancel it"),
                      desc=desc)
            return None
        self._desc = desc
        self.last_error = None
        self.last_result = None
        self.cancelled = False
        self._on_result = on_result
        self.status.value = f"{desc}…"
        self.progress_bar.visible = True
        self.progress_bar.min, self.progress_bar.max, self.progress_bar.value = 0, 0, 0
        self._pbar = progress(total=0, desc=desc)
        for b in self.action_buttons:
            b.enabled = False
        self.cancel_button.enabled = True
        worker = create_worker(
            job, *args, **kwargs,
            _start_thread=False,
            _connect={
                "yielded": self._on_step,
                "returned": self._on_returned,
                "errored": self._on_error,
                "aborted": self._on_aborted,
                "finished": self._on_finished,
            },
        )
        self.worker = worker
        worker.start()
        return worker

    def cancel(self, *_):
        """Ask the running job to stop at its next step."""
        if self.worker is not None:
            self.cancelled = True
            self.status.value = f"{self._desc}: cancelling…"
            self.worker.quit()

    def _on_step(self, step):
        if not self._alive:
            return
        total = max(int(getattr(step, "total", 0)), 0)
        done = max(int(getattr(step, "done", 0)), 0)
        self.progress_bar.max = total
        self.progress_bar.value = min(done, total) if total else 0
        if getattr(step, "message", ""):
            self.status.value = f"{self._desc}: {step.message}"
        pbar = self._pbar  # local: napari's progress may process events (and finish) re-entrantly
        if pbar is not None:
            if total and pbar.total != total:
                pbar.total = total
            if step.message:
                pbar.set_description(f"{self._desc}: {step.message}")
            delta = done - pbar.n
            if delta > 0:
                pbar.update(delta)

    def _on_returned(self, result):
        if not self._alive:
            return
        self.last_result = result
        try:
            self._on_result(result)
        except Exception as exc:  # displaying the result must not break the viewer
            self.fail(exc)
            return
        if self.last_error is None:
            self.status.value = f"{self._desc}: done"

    def _on_error(self, exc: BaseException):
        if not self._alive:
            log.error("%s failed after its widget closed: %s", self._desc, exc)
            return
        self.fail(exc)

    def fail(self, exc: BaseException, desc: str | None = None) -> None:
        """Report an error of the job ``desc``: status line, log and napari notification."""
        from napari.utils.notifications import show_error

        self.last_error = exc
        message = f"{desc or self._desc or 'astrovl'} failed: {exc}"
        log.error("%s\n%s", message, "".join(traceback.format_exception(exc)))
        self.status.value = message
        show_error(message)

    def _on_aborted(self):
        if not self._alive:
            return
        self.status.value = f"{self._desc}: cancelled"

    def _on_finished(self):
        pbar, self._pbar = self._pbar, None
        if pbar is not None:
            pbar.close()
        if not self._alive:
            self.worker = None
            return
        self.progress_bar.visible = False
        for b in self.action_buttons:
            b.enabled = True
        self.cancel_button.enabled = False
        self.worker = None


def make_runner_widgets() -> tuple[Label, ProgressBar, PushButton]:
    """Status label, progress bar and cancel button, unlabeled."""
    status = Label(value="ready")
    status.native.setWordWrap(True)
    bar = ProgressBar(min=0, max=0, value=0, label="")
    cancel = PushButton(text="Cancel")
    return status, bar, cancel
