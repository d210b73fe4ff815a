"""What the command families share: argument groups, output and input helpers."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "add_command", "add_model_args", "add_output_args", "add_image_args", "add_on_error_arg",
    "emit", "format_table", "display_value", "expand_images", "image_items", "check_images",
    "FileFailures", "run_per_file", "check_output_name", "check_positive", "check_text",
    "error_message", "with_flags", "load_clip", "load_clip_if_named", "load_llava", "parse_hdu",
    "read_lines", "conf", "OUTPUT_FORMATS", "MAX_PRINTED_ROWS",
]

#: table formats of ``--output`` by file-name suffix
OUTPUT_FORMATS = {".ecsv": "ascii.ecsv", ".csv": "ascii.csv", ".json": "json"}


def conf():
    """The astrovl configuration (imported lazily)."""
    from ..config import conf as _conf

    return _conf


def add_command(subparsers, name: str, help_text: str, examples: str, func) -> argparse.ArgumentParser:
    """Add subcommand ``name`` that runs ``func(args)``, with ``examples`` in its help."""
    p = subparsers.add_parser(
        name, help=help_text, description=help_text,
        epilog="examples:\n" + textwrap.indent(textwrap.dedent(examples).strip(), "  "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=func)
    return p


def add_model_args(p: argparse.ArgumentParser, default_model: str | None = None,
                   pretrained: bool = False) -> None:
    """``--model`` (and ``--pretrained`` for open_clip names) and ``--device``."""
    p.add_argument("--model", default=default_model,
                   help="model name, hub id or local directory" +
                   (f" (default: {default_model})" if default_model else ""))
    if pretrained:
        p.add_argument("--pretrained", default=None,
                       help="open_clip pretrained tag (e.g. 'openai') when --model is an open_clip name")
    p.add_argument("--device", default=None, help="torch device: auto, cpu, cuda, cuda:N")


def add_output_args(p: argparse.ArgumentParser) -> None:
    """``--output`` (a table file) and ``--format`` (what is printed)."""
    p.add_argument("--output", "-o", default=None,
                   help="write the result table to this file (format from the suffix: .ecsv, .csv, .json)")
    p.add_argument("--format", choices=("table", "ecsv", "csv", "json"), default="table",
                   help="format printed on standard output (default: a readable table)")


def parse_hdu(value):
    """``--hdu`` text (an index, ``EXTNAME`` or ``EXTNAME,EXTVER``) as :func:`~astrovl.load_image` takes it.

    The argparse ``type`` of every ``--hdu``: a malformed value is a usage error.
    """
    from ..imaging.inputs import parse_hdu as _parse

    try:
        return _parse(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_image_args(p: argparse.ArgumentParser, what: str = "every FITS file") -> None:
    """``--hdu`` and ``--plane``: what is read from the FITS files a command reads."""
    p.add_argument("--hdu", type=parse_hdu, default=None, metavar="HDU",
                   help=f"HDU read from {what}: an index (1), an EXTNAME (SCI) or EXTNAME,EXTVER "
                   "(SCI,2) (default: the science HDU; files with several, such as HST chips, need it)")
    p.add_argument("--plane", type=int, default=None,
                   help="plane of a cube, or colour channel of a colour picture, to read (default: a "
                   "cube of 3 planes is shown as colour, other cubes need it)")


def add_search_settings_args(p: argparse.ArgumentParser, scope: str) -> None:
    """``--nprobe``, ``--ef-search`` and ``--rerank-depth``: an index's search settings, for ``scope``."""
    for flag, what in (("--nprobe", "cells searched by an 'ivf' or 'ivfpq' index"),
                       ("--ef-search", "search breadth of an 'hnsw' index"),
                       ("--rerank-depth", "candidates an 'ivfpq' index re-scores exactly")):
        p.add_argument(flag, type=int, default=None, help=f"{what} {scope} (default: the index's)")


def add_on_error_arg(p: argparse.ArgumentParser) -> None:
    """``--on-error``: what a command on many files does with one it cannot read."""
    p.add_argument("--on-error", choices=("skip", "stop"), default="skip",
                   help="a file that cannot be read: 'skip' reports it, goes on with the others and "
                   "exits with status 2 after a summary; 'stop' ends the command (default: skip)")


def image_items(args, paths: Sequence[str]) -> list:
    """The image inputs of ``paths`` with the command's ``--hdu``/``--plane`` (paths when neither is given)."""
    from ..imaging.inputs import ImageFile

    hdu, plane = getattr(args, "hdu", None), getattr(args, "plane", None)
    if hdu is None and plane is None:
        return list(paths)
    return [ImageFile(p, hdu=hdu, plane=plane) for p in paths]


def _spell_flag(name: str, value) -> str:
    from ..imaging.inputs import format_hdu

    return f"--{name}" if value is None else f"--{name} {format_hdu(value)}"


def with_flags(text: str) -> str:
    """Library text (a build report) with its ``hdu=``/``plane=`` suggestions written as ``--hdu``/``--plane``."""
    from ..exceptions import spell_options

    return spell_options(text, ("hdu", "plane"), _spell_flag)


def error_message(exc: BaseException) -> str:
    """The first line of ``exc``'s message, with the library's ``hdu=``/``plane=`` suggestions as flags."""
    from ..exceptions import ImageInputError

    text = exc.message_with(_spell_flag) if isinstance(exc, ImageInputError) else str(exc)
    text = text.strip()
    return text.splitlines()[0] if text else type(exc).__name__


class FileFailures:
    """The files a command on many files could not read, and what it does about them."""

    def __init__(self, on_error: str = "stop"):
        self.on_error = on_error
        self.failed: dict[str, str] = {}

    def add(self, name: str, exc: BaseException) -> None:
        """Record that ``name`` failed; re-raise ``exc`` under ``--on-error stop``."""
        if self.on_error == "stop":
            raise exc
        self.failed[str(name)] = error_message(exc)
        print(f"skipped {name}: {self.failed[str(name)]}", file=sys.stderr)

    def finish(self, done: int) -> int:
        """Print the summary (when files were skipped) and return the exit code."""
        if not self.failed:
            return 0
        print(f"{len(self.failed)} of {done + len(self.failed)} files could not be read and were "
              f"skipped: {', '.join(self.failed)}", file=sys.stderr)
        return 2


def _file_errors() -> tuple[type[BaseException], ...]:
    """Errors that concern one input file (the others can still be processed)."""
    from ..exceptions import ImageFileError, ImageInputError

    return (ImageInputError, ImageFileError, OSError)


def check_images(args, paths: Sequence[str], failures: FileFailures | None = None) -> list[str]:
    """The ``paths`` whose images can be read as the command will read them (headers only).

    Runs before a model loads. A file that cannot be read stops the command,
    or, with ``failures`` under ``--on-error skip``, is reported and left out.
    """
    from ..imaging import check_image

    keep, last = [], None
    for path, item in zip(paths, image_items(args, paths)):
        try:
            check_image(item)
        except _file_errors() as exc:
            if failures is None or len(paths) == 1:
                raise
            failures.add(path, exc)
            last = exc
            continue
        keep.append(path)
    if not keep:
        raise ValueError(f"none of the {len(paths)} image files could be read; the last: "
                         f"{error_message(last)}")
    return keep


def run_per_file(args, paths: Sequence[str], run, *, chunk_size: int, failures: FileFailures,
                 progress: str | None = None) -> tuple[list[str], list]:
    """Apply ``run`` (a list of image inputs -> a list of results) to ``paths`` chunk by chunk.

    A chunk that fails because of a file is run again file by file, so the
    file that cannot be read is reported (``failures``) and the others give
    their results. Returns the paths that gave a result and the results.
    """
    from ..utils.progress import progress_bar

    done, results = [], []
    items = image_items(args, paths)
    bar = progress_bar(total=len(paths), enabled=progress is not None and len(paths) > chunk_size,
                       desc=progress or "", unit="img")
    for start in range(0, len(paths), chunk_size):
        chunk = list(zip(paths[start:start + chunk_size], items[start:start + chunk_size]))
        try:
            out = list(run([item for _, item in chunk]))
        except _file_errors() as exc:
            if len(chunk) == 1:
                failures.add(chunk[0][0], exc)
                out = None
            else:  # find the file: one at a time
                out = None
                for path, item in chunk:
                    try:
                        results += list(run([item]))
                        done.append(path)
                    except _file_errors() as one:
                        failures.add(path, one)
        if out is not None:
            done += [p for p, _ in chunk]
            results += out
        bar.update(len(chunk))
    bar.close()
    return done, results


def check_output_name(path: str | None, option: str = "--output") -> None:
    """Refuse an ``--output`` table file name whose suffix names no table format (before any work)."""
    if path and Path(path).suffix.lower() not in OUTPUT_FORMATS:
        raise ValueError(f"{option} {path!r}: use a .ecsv, .csv or .json file name")
    if path and Path(path).is_dir():
        raise ValueError(f"{option} {path!r} is a directory; give a file name")


def check_positive(args, *names: str) -> None:
    """Refuse a count option (``--batch-size``...) below 1 (before a model loads)."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} {value}: give a number of at least 1")


def check_text(text: str | None, what: str) -> None:
    """Refuse an empty question or instruction (before a model loads)."""
    if text is not None and not text.strip():
        raise ValueError(f"{what} is empty; write a question or instruction")


def emit(table, args) -> None:
    """Print ``table`` in the requested format and write it if ``--output`` was given."""
    out = getattr(args, "output", None)
    if out:
        check_output_name(out)
        fmt = OUTPUT_FORMATS[Path(out).suffix.lower()]
        from ..utils.files import atomic_write

        with atomic_write(out, "w") as fh:
            if fmt == "json":
                json.dump(_table_records(table), fh, indent=2)
            else:
                (_csv_safe(table) if fmt == "ascii.csv" else table).write(fh, format=fmt)
    fmt = getattr(args, "format", "table")
    if fmt == "table":
        print(format_table(table))
    elif fmt == "json":
        print(json.dumps(_table_records(table), indent=2))
    else:
        if fmt == "ecsv":
            table.write(sys.stdout, format="ascii.ecsv")
        else:
            _csv_safe(table).write(sys.stdout, format="ascii.csv")


#: rows printed by ``--format table`` (the file given with ``--output`` holds them all)
MAX_PRINTED_ROWS = 200


def display_value(value) -> str:
    """A table cell as printed: floats to 4 significant digits, masked values empty.

    Examples
    --------
    >>> display_value(5.997063636779785), display_value(0.0002500000000000001), display_value(12)
    ('5.997', '0.00025', '12')
    """
    import numpy as np

    if value is None or value is np.ma.masked:
        return ""
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4g}"
    if isinstance(value, np.ndarray):
        with np.printoptions(precision=4, suppress=True, threshold=8):
            return np.array2string(value, separator=" ")
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value.item() if isinstance(value, np.generic) else value)


def format_table(table, width: int | None = None) -> str:
    """``table`` as readable text: numbers rounded and right-aligned, text left-aligned and
    wrapped so that each line fits ``width`` characters (default: the terminal's width).

    Only the first :data:`MAX_PRINTED_ROWS` rows are shown; a last line says how
    many were left out.
    """
    import shutil

    if width is None:
        width = shutil.get_terminal_size((120, 24)).columns
    names = list(table.colnames)
    if not names:
        return "(empty table)"
    rows = table[:MAX_PRINTED_ROWS]
    cells = {c: [display_value(v) for v in rows[c]] for c in names}
    text_cols = {c for c in names if table[c].dtype.kind in "UOSb" or table[c].ndim > 1}
    natural = {c: max([len(c)] + [len(ln) for v in cells[c] for ln in (v.splitlines() or [""])])
               for c in names}
    widths = dict(natural)
    spare = width - 2 * (len(names) - 1) - sum(natural[c] for c in names if c not in text_cols)
    wide = [c for c in names if c in text_cols]
    if wide and sum(natural[c] for c in wide) > spare:
        # text columns share what the others leave, each at least its header (and 12 characters)
        floor = {c: min(natural[c], max(len(c), 12)) for c in wide}
        room = max(spare, sum(floor.values()))
        for c in sorted(wide, key=lambda c: natural[c]):
            fair = max(floor[c], room // len(wide))
            widths[c] = min(natural[c], fair)
            room -= widths[c]
            wide = [w for w in wide if w != c]
    lines = ["  ".join(c.ljust(widths[c]) if c in text_cols else c.rjust(widths[c]) for c in names).rstrip(),
             "  ".join("-" * widths[c] for c in names)]
    for i in range(len(rows)):
        parts = {c: (_wrap(cells[c][i], widths[c]) if c in text_cols else [cells[c][i]]) for c in names}
        for k in range(max(len(p) for p in parts.values())):
            lines.append("  ".join(
                (p[k] if k < len(p) else "").ljust(widths[c]) if c in text_cols
                else (p[k] if k < len(p) else "").rjust(widths[c])
                for c, p in parts.items()).rstrip())
    if len(table) > len(rows):
        lines.append(f"... {len(table) - len(rows)} more rows (write them all with --output)")
    return "\n".join(lines)


def _wrap(text: str, width: int) -> list[str]:
    out = []
    for para in text.splitlines() or [""]:
        out += textwrap.wrap(para, width, break_long_words=True, break_on_hyphens=False) or [""]
    return out


#: characters other than "\n" that Python's ``str.splitlines`` (and so some CSV
#: readers) take as the end of a line
_LINE_BREAKS = str.maketrans({c: "\n" for c in "\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"})


def _csv_safe(table):
    """``table`` with every line break in its text cells written as ``"\\n"``.

    A CSV field that holds a line break is quoted, and readers keep it in one
    row; other line-break characters (vertical tab, form feed, ``"\\r"``,
    Unicode separators) are not always quoted or are split by readers that use
    ``str.splitlines``, which would break the row apart.
    """
    text_cols = [c for c in table.colnames if table[c].dtype.kind in "UO"]
    if not text_cols:
        return table
    from astropy.table import MaskedColumn

    out = table.copy(copy_data=False)
    for c in text_cols:
        col = table[c]
        mask = getattr(col, "mask", None)
        values = [v.replace("\r\n", "\n").translate(_LINE_BREAKS) if isinstance(v, str) else v
                  for v in (col.filled("") if mask is not None else col)]
        out[c] = MaskedColumn(values, mask=mask) if mask is not None else values
    return out


def _table_records(table) -> list[dict]:
    recs = []
    for row in table:
        rec = {}
        for c in table.colnames:
            v = row[c]
            rec[c] = v.item() if hasattr(v, "item") else v
        recs.append(rec)
    return recs


def expand_images(inputs: Sequence[str]) -> list[str]:
    """Image files named in ``inputs``, directories searched recursively."""
    from ..imaging.inputs import is_image_name

    out: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for f in sorted(path.rglob("*")):
                if f.is_file() and is_image_name(f):
                    out.append(str(f))
        else:
            out.append(str(path))
    if not out:
        raise ValueError(f"no image files found in {list(inputs)}")
    return out


def read_lines(path) -> list[str]:
    """Non-empty, non-comment lines of a text file (one category per line)."""
    lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise ValueError(f"{path}: no categories found (one per line expected)")
    return lines


def load_clip(args):
    """The CLIP model named by ``--model``/``--pretrained`` (default: the configured one)."""
    from ..clip import CLIPEmbedder

    model = args.model
    pretrained = getattr(args, "pretrained", None)
    if model is None:
        if pretrained is not None:
            raise ValueError(f"--pretrained {pretrained!r} needs --model (the open_clip model name "
                             "it is a tag of)")
        model, pretrained = conf().clip_model, (conf().clip_pretrained or None)
    return CLIPEmbedder.from_pretrained(model, pretrained, device=args.device)


def load_clip_if_named(args):
    """The CLIP model named by ``--model``, or None (``--pretrained`` alone is refused)."""
    if args.model is None:
        if getattr(args, "pretrained", None) is not None:
            raise ValueError(f"--pretrained {args.pretrained!r} needs --model (the open_clip model name "
                             "it is a tag of)")
        return None
    return load_clip(args)


def load_llava(args):
    """The AstroLLaVA model named by ``--model`` (default: the configured one)."""
    from ..llava import AstroLLaVA

    return AstroLLaVA.from_pretrained(args.model or conf().llava_model, revision=getattr(args, "revision", None),
                                      device=args.device)
