"""napari plugin for astrovl: read FITS images, caption, ask, search and classify."""

__all__: list[str] = []
