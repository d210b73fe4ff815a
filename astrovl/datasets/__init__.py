"""Dataset builders and datasets sharing one manifest schema (see :mod:`astrovl.datasets.records`)."""

from .abstracts import raw_abstract_caption, read_abstracts
from .hubble import HubblePreviewDatasetBuilder
from .outreach import OutreachDatasetBuilder
from .records import ManifestDataset, read_manifest, write_manifest
from .synthetic import SYNTHETIC_CLASSES, SyntheticSkyDataset

__all__ = [
    "ManifestDataset",
    "read_manifest",
    "write_manifest",
    "SyntheticSkyDataset",
    "SYNTHETIC_CLASSES",
    "HubblePreviewDatasetBuilder",
    "OutreachDatasetBuilder",
    "read_abstracts",
    "raw_abstract_caption",
]
