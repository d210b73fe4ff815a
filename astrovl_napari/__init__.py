"""napari plugin for astrovl: read FITS images, caption, ask, search and classify.

The plugin is declared in ``napari.yaml`` (npe2). Importing this package is
light; napari, Qt and the models load only when a widget or the reader is used.
"""

from __future__ import annotations

from astrovl._lazy import lazy_exports

# public name -> module that defines it
_LAZY = {
    "napari_get_reader": "astrovl_napari._reader",
    "read_fits": "astrovl_napari._reader",
    "fits_layer_data": "astrovl_napari._reader",
    "image_layer_data": "astrovl_napari._reader",
    "ModelRegistry": "astrovl_napari._models",
    "ModelSpec": "astrovl_napari._models",
    "default_registry": "astrovl_napari._models",
    "CaptionWidget": "astrovl_napari._caption_widget",
    "SearchWidget": "astrovl_napari._search_widget",
    "ClassifyWidget": "astrovl_napari._classify_widget",
}

__all__ = list(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
