"""Dataset builders and datasets sharing one manifest schema (see :mod:`astrovl.datasets.records`)."""

from .abstracts import raw_abstract_caption, read_abstracts
from .galaxy10 import GALAXY10_CLASS_NAMES, GALAXY10_CLASSES, load_galaxy10
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
    "load_galaxy10",
    "GALAXY10_CLASSES",
    "GALAXY10_CLASS_NAMES",
]
