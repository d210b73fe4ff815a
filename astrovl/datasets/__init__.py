"""Dataset builders and datasets sharing one manifest schema (see :mod:`astrovl.datasets.records`)."""

from .records import ManifestDataset, read_manifest, write_manifest
from .synthetic import SYNTHETIC_CLASSES, SyntheticSkyDataset

__all__ = ["ManifestDataset", "read_manifest", "write_manifest", "SyntheticSkyDataset", "SYNTHETIC_CLASSES"]
