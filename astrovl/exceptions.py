"""Exception types raised by astrovl.

Every error derives from :class:`AstroVLError` and from the built-in exception
that best describes it, so ``except ValueError`` keeps working for callers that
do not know about astrovl.
"""

from astropy.utils.exceptions import AstropyUserWarning

__all__ = [
    "AstroVLError",
    "ImageInputError",
    "ImageFileError",
    "ModelNotFoundError",
    "CheckpointError",
    "DatasetError",
    "ManifestError",
    "IndexMismatchError",
    "GenerationError",
    "QueryError",
    "OutputDirectoryError",
    "UntrustedSourceError",
    "AstroVLWarning",
    "ImageFileWarning",
]


class AstroVLError(Exception):
    """Base class of all astrovl errors."""


class ImageInputError(AstroVLError, ValueError):
    """An image input cannot be turned into an :class:`~astrovl.AstroImage`."""


class ModelNotFoundError(AstroVLError, OSError):
    """A model name, path or hub id cannot be resolved (for example offline)."""


class CheckpointError(AstroVLError, OSError):
    """A saved model, index or training checkpoint is missing, partial or corrupt."""


class DatasetError(AstroVLError, ValueError):
    """A dataset, its inputs or its configuration is invalid."""


class ManifestError(DatasetError):
    """A dataset manifest is malformed or points outside its dataset root."""


class IndexMismatchError(AstroVLError, ValueError):
    """An embedding index and an embedder (or vectors) do not match."""


class GenerationError(AstroVLError, RuntimeError):
    """A language model failed to produce valid structured output."""


class ImageFileError(AstroVLError, OSError):
    """An image file is missing, truncated, corrupt or of an unknown format."""


class AstroVLWarning(AstropyUserWarning):
    """Base class of the warnings astrovl issues."""


class ImageFileWarning(AstroVLWarning):
    """A file was read although it is not standard: what was fixed or ignored is in the message."""


class QueryError(AstroVLError, ValueError):
    """A request to a search service is malformed or names nothing that exists.

    Parameters
    ----------
    message : str
        What was asked and what to do instead.
    status : int
        The HTTP status that describes the problem (400 malformed, 404 unknown
        item, 413 too large, 415 unsupported type).
    """

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = int(status)


class OutputDirectoryError(AstroVLError, FileExistsError):
    """An output folder holds files that astrovl did not write, or another kind of output.

    astrovl replaces or fills a folder only when it is missing, empty, or an
    earlier astrovl output of the same kind (it carries the marker file
    ``.astrovl-output.json``); the message names the folder and a new subfolder
    to use instead.
    """


class UntrustedSourceError(DatasetError):
    """A record names an image source that is not allowed.

    Records may name only ``http(s)`` URLs, or files under the local root the
    caller passes explicitly; other schemes (``file://``, ``ftp://``...) and
    paths outside that root are refused.
    """
