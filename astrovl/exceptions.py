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
    "spell_options",
]


class AstroVLError(Exception):
    """Base class of all astrovl errors."""


class ImageInputError(AstroVLError, ValueError):
    """An image input cannot be turned into an :class:`~astrovl.AstroImage`.

    Parameters
    ----------
    message : str
        What is wrong and what to do.
    options : sequence of str, optional
        The keyword arguments of :func:`~astrovl.load_image` that the message
        suggests (``"hdu"``, ``"plane"``), written in it as ``hdu=`` or
        ``hdu=VALUE`` (a Python literal). A front end that spells these
        choices another way (the command line's ``--hdu SCI,1``) rewrites
        them with :meth:`message_with`.
    """

    def __init__(self, message: str = "", *, options=()):
        super().__init__(message)
        self.options = tuple(options)

    def message_with(self, spell) -> str:
        """The message with each suggested option spelled by ``spell(name, value)``.

        ``value`` is the Python value written after ``name=`` (``1``, ``"SCI"``,
        ``("SCI", 2)``), or None where the message names the option alone.

        Examples
        --------
        >>> err = ImageInputError("x.fits: choose one with hdu=('SCI', 1) or hdu=", options=("hdu",))
        >>> err.message_with(lambda name, v: f"--{name}" + ("" if v is None else f" {v[0]},{v[1]}"))
        'x.fits: choose one with --hdu SCI,1 or --hdu'
        """
        return spell_options(str(self), self.options, spell)


def spell_options(text: str, options, spell) -> str:
    """``text`` with each ``name=`` or ``name=VALUE`` of the ``options`` spelled by ``spell(name, value)``.

    ``VALUE`` is a Python literal (an int, a quoted string, a ``('NAME', N)``
    pair) and ``spell`` receives its value (None where the option stands alone).
    """
    import ast
    import re

    literal = r"\('[^']*',\s*-?\d+\)|'[^']*'|\"[^\"]*\"|-?\d+"
    for name in options:
        text = re.sub(rf"\b{re.escape(name)}=({literal})?",
                      lambda m, n=name: spell(n, None if m.group(1) is None else ast.literal_eval(m.group(1))),
                      text)
    return text


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
