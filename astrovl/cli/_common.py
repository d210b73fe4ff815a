"""What the command families share: argument groups, output and input helpers."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

__all__ = ["add_command", "add_model_args", "add_output_args", "emit", "expand_images",
           "load_clip", "load_clip_if_named", "load_llava", "parse_hdu", "read_lines", "conf"]


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
    """``--hdu`` as an index when it is a number, else an EXTNAME."""
    if value is None:
        return None
    return int(value) if str(value).lstrip("-").isdigit() else value


def emit(table, args) -> None:
    """Print ``table`` in the requested format and write it if ``--output`` was given."""
    out = getattr(args, "output", None)
    if out:
        suffix = Path(out).suffix.lower()
        fmt = {".ecsv": "ascii.ecsv", ".csv": "ascii.csv", ".json": "json"}.get(suffix)
        if fmt is None:
            raise ValueError(f"--output {out!r}: use a .ecsv, .csv or .json file name")
        from ..utils.files import atomic_write

        with atomic_write(out, "w") as fh:
            if fmt == "json":
                json.dump(_table_records(table), fh, indent=2)
            else:
                (_csv_safe(table) if fmt == "ascii.csv" else table).write(fh, format=fmt)
    fmt = getattr(args, "format", "table")
    if fmt == "table":
        table.pprint_all() if len(table) <= 200 else table.pprint(max_lines=60, max_width=200)
    elif fmt == "json":
        print(json.dumps(_table_records(table), indent=2))
    else:
        if fmt == "ecsv":
            table.write(sys.stdout, format="ascii.ecsv")
        else:
            _csv_safe(table).write(sys.stdout, format="ascii.csv")


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
