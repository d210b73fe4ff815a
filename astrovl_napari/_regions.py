"""Which pixels a widget sends to a model: a whole layer, the field of view or a rectangle.

The geometry (bounding boxes in layer data coordinates) is computed from napari
layer objects and camera values only, so it is tested without a viewer window.
A :class:`RegionRequest` is built on the main thread (it reads the viewer state)
and turned into an :class:`~astrovl.AstroImage` in a worker thread
(:meth:`RegionRequest.load`): the cutout keeps the WCS (through
:class:`astropy.nddata.Cutout2D`) and the library's default scaling is
recomputed on the region, as :func:`astrovl.cutout` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "REGION_MODES",
    "MIN_REGION_SIZE",
    "BBox",
    "RegionRequest",
    "plane_shape",
    "world_box_to_bbox",
    "field_of_view_world",
    "field_of_view_bbox",
    "shape_bbox",
    "display_origin",
    "leading_indices",
    "region_request",
]

#: region choices offered by the widgets
REGION_MODES = ("whole layer", "field of view", "shapes rectangle")

#: smallest region side (pixels) sent to a model
MIN_REGION_SIZE = 8


@dataclass(frozen=True)
class BBox:
    """A half-open pixel box ``[y0, y1) x [x0, x1)`` in layer data coordinates (row, column)."""

    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    def as_list(self) -> list[int]:
        """``[y0, y1, x0, x1]`` (JSON-friendly)."""
        return [self.y0, self.y1, self.x0, self.x1]

    def __str__(self) -> str:
        return f"[{self.y0}:{self.y1}, {self.x0}:{self.x1}]"


def plane_shape(layer) -> tuple[int, int]:
    """``(height, width)`` of the displayed plane of an image layer."""
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    shape = tuple(data.shape)
    return (shape[-3], shape[-2]) if getattr(layer, "rgb", False) else (shape[-2], shape[-1])


def _spatial_ndim(layer) -> int:
    """Number of layer (data) dimensions, colour axis excluded."""
    return int(layer.ndim)


def world_box_to_bbox(layer, world_corners: np.ndarray, *, clip: bool = True) -> BBox:
    """Convert a box given by world-coordinate corners to a pixel :class:`BBox` of ``layer``.

    Parameters
    ----------
    layer : napari.layers.Image
    world_corners : array of shape (N, ndim_world)
        Points spanning the box (two opposite corners suffice; all four corners
        are used when the layer is rotated or sheared). Only the last two layer
        dimensions are used.
    clip : bool
        Clip to the layer's pixel grid.

    Raises
    ------
    ValueError
        If the box does not overlap the layer or is smaller than
        :data:`MIN_REGION_SIZE` pixels on a side.
    """
    corners = np.atleast_2d(np.asarray(world_corners, dtype=float))
    ndim = _spatial_ndim(layer)
    if corners.shape[1] < ndim:
        pad = np.zeros((corners.shape[0], ndim - corners.shape[1]))
        corners = np.concatenate([pad, corners], axis=1)
    if len(corners) == 2 and ndim >= 2:
        (a, b) = corners
        extra = []
        for ya, xb in ((a, b), (b, a)):
            c = ya.copy()
            c[-1] = xb[-1]
            extra.append(c)
        corners = np.vstack([corners, *extra])
    data_pts = np.array([np.asarray(layer.world_to_data(c), dtype=float)[-2:] for c in corners])
    lo = data_pts.min(axis=0)
    hi = data_pts.max(axis=0)
    # pixel i covers [i - 0.5, i + 0.5)
    y0, x0 = (int(np.floor(v + 0.5)) for v in lo)
    y1, x1 = (int(np.ceil(v + 0.5)) for v in hi)
    if clip:
        h, w = plane_shape(layer)
        y0, y1 = max(y0, 0), min(y1, h)
        x0, x1 = max(x0, 0), min(x1, w)
    if y1 <= y0 or x1 <= x0:
        raise ValueError(
            f"the region does not overlap layer {layer.name!r}; move the view or the rectangle "
            "onto the image"
        )
    box = BBox(y0, y1, x0, x1)
    if box.height < MIN_REGION_SIZE or box.width < MIN_REGION_SIZE:
        raise ValueError(
            f"the region {box} of layer {layer.name!r} is {box.height}x{box.width} pixels; it must "
            f"be at least {MIN_REGION_SIZE}x{MIN_REGION_SIZE}: zoom out or draw a larger rectangle"
        )
    return box


def field_of_view_world(center: Sequence[float], zoom: float, canvas_size: Sequence[int]
                        ) -> np.ndarray:
    """World corners of what the 2-D canvas shows.

    Parameters
    ----------
    center : sequence of float
        ``viewer.camera.center``; the last two values are the displayed (y, x).
    zoom : float
        ``viewer.camera.zoom`` (screen pixels per world unit).
    canvas_size : (int, int)
        ``viewer.canvas.size`` (height, width) in screen pixels.

    Returns
    -------
    numpy.ndarray
        ``[[y_min, x_min], [y_max, x_max]]``.
    """
    if zoom <= 0:
        raise ValueError(f"camera zoom {zoom!r} must be positive")
    cy, cx = (float(v) for v in tuple(center)[-2:])
    half = np.asarray(canvas_size, dtype=float)[:2] / (2.0 * float(zoom))
    return np.array([[cy - half[0], cx - half[1]], [cy + half[0], cx + half[1]]])


def field_of_view_bbox(layer, *, center, zoom: float, canvas_size, world_point=None) -> BBox:
    """Pixel box of ``layer`` visible on the canvas (clipped to the layer)."""
    corners = field_of_view_world(center, zoom, canvas_size)
    if world_point is not None:
        base = np.asarray(world_point, dtype=float)
        full = np.repeat(base[None, :], 2, axis=0)
        full[:, -2:] = corners
        corners = full
    return world_box_to_bbox(layer, corners)


def shape_bbox(shapes_layer, image_layer, index: int | None = None) -> BBox:
    """Pixel box of ``image_layer`` under one shape of ``shapes_layer``.

    Parameters
    ----------
    shapes_layer : napari.layers.Shapes
    image_layer : napari.layers.Image
    index : int, optional
        Which shape; default the selected shape, or else the last rectangle drawn
        (or the last shape when there is no rectangle).

    Raises
    ------
    ValueError
        If the shapes layer is empty or the index is out of range.
    """
    n = len(shapes_layer.data)
    if n == 0:
        raise ValueError(
            f"shapes layer {shapes_layer.name!r} has no shape; draw a rectangle on it first"
        )
    if index is None:
        selected = sorted(getattr(shapes_layer, "selected_data", ()) or ())
        if selected:
            index = selected[-1]
        else:
            types = list(shapes_layer.shape_type)
            rects = [i for i, t in enumerate(types) if t == "rectangle"]
            index = rects[-1] if rects else n - 1
    if not 0 <= index < n:
        raise ValueError(f"shape index {index} is out of range for {n} shapes")
    vertices = np.asarray(shapes_layer.data[index], dtype=float)
    world = np.array([shapes_layer.data_to_world(v) for v in vertices])
    return world_box_to_bbox(image_layer, world)


def display_origin(layer, *, camera_vertical: str = "down") -> str:
    """``"lower"`` when row 0 of ``layer`` shows at the bottom of the canvas, else ``"upper"``.

    Parameters
    ----------
    layer : napari.layers.Layer
    camera_vertical : {"down", "up"}
        ``viewer.camera.orientation2d[0]`` (napari's default is "down": world y
        grows downwards on screen).
    """
    ndim = int(layer.ndim)
    p0 = np.zeros(ndim)
    p1 = p0.copy()
    p1[-2] = 1.0
    dy = np.asarray(layer.data_to_world(p1), dtype=float) - np.asarray(layer.data_to_world(p0), dtype=float)
    rows_go_down = dy[-2] > 0
    if str(camera_vertical).lower().endswith("up"):
        rows_go_down = not rows_go_down
    return "upper" if rows_go_down else "lower"


def leading_indices(layer, world_point=None) -> tuple[int, ...]:
    """Indices of the non-displayed (slider) axes of ``layer`` at ``world_point``.

    ``world_point`` is ``viewer.dims.point``; without it plane 0 of each axis is used.
    """
    ndim = int(layer.ndim)
    nlead = ndim - 2
    if nlead <= 0:
        return ()
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    if world_point is None:
        return (0,) * nlead
    pos = np.asarray(layer.world_to_data(np.asarray(world_point, dtype=float)), dtype=float)
    idx = []
    for axis in range(nlead):
        i = int(np.clip(np.round(pos[axis]), 0, data.shape[axis] - 1))
        idx.append(i)
    return tuple(idx)


@dataclass
class RegionRequest:
    """Pixels of one layer to turn into an :class:`~astrovl.AstroImage` (in any thread).

    Attributes
    ----------
    data : array-like
        The layer's data (full resolution level for multiscale layers).
    name : str
        Layer name.
    bbox : BBox
    lead : tuple of int
        Indices of the leading (slider) axes.
    rgb : bool
    wcs, header
        From the layer metadata, if any.
    origin : {"lower", "upper"}
        Where row 0 shows on the canvas; models see the region as displayed.
    stretch, interval
        Scaling for :func:`astrovl.load_image` (None: library defaults).
    """

    data: Any
    name: str
    bbox: BBox
    lead: tuple[int, ...] = ()
    rgb: bool = False
    wcs: Any = None
    header: Any = None
    origin: str = "upper"
    stretch: Any = None
    interval: Any = None
    info: dict = field(default_factory=dict)

    def describe(self) -> str:
        """``layer[y0:y1, x0:x1]`` (with the plane for cubes)."""
        lead = "".join(f"[{i}]" for i in self.lead)
        return f"{self.name}{lead}{self.bbox}"

    def load(self):
        """Cut the region out and scale it: returns an :class:`~astrovl.AstroImage`.

        Raises
        ------
        astrovl.exceptions.ImageInputError
            If the region holds no finite pixel.
        """
        from astropy.nddata import Cutout2D

        from astrovl import load_image

        plane = np.asarray(self.data[self.lead] if self.lead else self.data)
        box = self.bbox
        cut_wcs = None
        if self.wcs is not None and not self.rgb:
            position = ((box.x0 + box.x1 - 1) / 2.0, (box.y0 + box.y1 - 1) / 2.0)
            cut = Cutout2D(plane, position, (box.height, box.width), wcs=self.wcs, mode="strict",
                           copy=True)
            sub, cut_wcs = cut.data, cut.wcs
        else:
            sub = np.array(plane[box.slices])
        picture = sub.dtype == np.uint8 and self.stretch is None and self.interval is None
        src = (sub, cut_wcs) if cut_wcs is not None else sub
        if self.rgb and sub.ndim == 3 and sub.shape[-1] == 4:
            sub = sub[..., :3]
            src = sub
        image = load_image(src, stretch=self.stretch, interval=self.interval)
        if self.header is not None:
            header = self.header.copy()
            if cut_wcs is not None:  # no stale CD/PC/SIP keys of the layer's header stay
                from astrovl.imaging.pixel_grid import header_with_wcs

                header = header_with_wcs(header, cut_wcs)
            image.header = header
        image.source = self.describe()
        image.meta.update(origin=self.origin, bbox=box.as_list(), plane=list(self.lead),
                          layer=self.name, picture=bool(picture or image.meta.get("picture")))
        return image


def region_request(layer, mode: str = "whole layer", *, world_point=None, center=None,
                   zoom: float | None = None, canvas_size=None, shapes_layer=None,
                   shape_index: int | None = None, camera_vertical: str = "down") -> RegionRequest:
    """Build the :class:`RegionRequest` for ``layer`` and a region ``mode``.

    Parameters
    ----------
    layer : napari.layers.Image
    mode : {"whole layer", "field of view", "shapes rectangle"}
    world_point : sequence of float, optional
        ``viewer.dims.point`` (selects the plane of cubes).
    center, zoom, canvas_size
        Camera values, needed for ``"field of view"``.
    shapes_layer : napari.layers.Shapes, optional
        Needed for ``"shapes rectangle"``.
    shape_index : int, optional
        Which shape (default: selected or last rectangle).
    camera_vertical : {"down", "up"}
        ``viewer.camera.orientation2d[0]``.
    """
    from napari.layers import Image

    if not isinstance(layer, Image):
        raise ValueError(
            f"layer {getattr(layer, 'name', layer)!r} is not an image layer; select an image layer"
        )
    if mode not in REGION_MODES:
        raise ValueError(f"region mode {mode!r} is not known; use one of {REGION_MODES}")
    h, w = plane_shape(layer)
    if mode == "whole layer":
        bbox = BBox(0, h, 0, w)
    elif mode == "field of view":
        if center is None or zoom is None or canvas_size is None:
            raise ValueError("the field of view needs the camera center, zoom and canvas size")
        bbox = field_of_view_bbox(layer, center=center, zoom=zoom, canvas_size=canvas_size,
                                  world_point=world_point)
    else:
        if shapes_layer is None:
            raise ValueError(
                "no shapes layer chosen; add a Shapes layer, draw a rectangle and choose it"
            )
        bbox = shape_bbox(shapes_layer, layer, shape_index)
    meta = layer.metadata or {}
    info = meta.get("astrovl", {}) if isinstance(meta.get("astrovl", {}), dict) else {}
    data = layer.data[0] if layer.multiscale else layer.data
    return RegionRequest(
        data=data,
        name=layer.name,
        bbox=bbox,
        lead=leading_indices(layer, world_point),
        rgb=bool(layer.rgb),
        wcs=meta.get("wcs"),
        header=meta.get("header"),
        origin=display_origin(layer, camera_vertical=camera_vertical),
        info=dict(info),
    )
