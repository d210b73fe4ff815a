"""Seeded fuzzing of the FITS reader with mutated copies of real FITS files.

The seeds are real telescope images installed with astropy (its test data: M13
plain and tile-compressed with Rice, gzip, HCOMPRESS and PLIO, NGC 1316
tile-compressed, a gzip-compressed DSS plate, an HST ACS file with SCI/ERR/DQ
chips). Each case is one seed with one mutation:

``bitflip``
    1 to 8 random bits flipped, half of the time inside a header.
``truncate``
    the file cut at a random offset.
``card``
    a header card (``NAXISn``, ``BITPIX``, ``BSCALE``, ``BZERO``, ``BLANK``,
    ``PCOUNT``, ``GCOUNT``, ``ZBITPIX``, ``ZNAXISn``, ``ZTILEn``, ``CTYPEn``,
    ``THEAP``...) given an absurd value, or such a card added.
``tile``
    bytes of a tile-compressed HDU overwritten: its tile descriptors or its
    compressed tiles (files without such an HDU get random bytes in their data).
``duplicate``
    one to three 2880-byte blocks copied to another block boundary.

Gzip-compressed seeds are mutated in their decompressed stream and compressed
again, or (for ``bitflip`` and ``truncate``, half of the time) in the
compressed bytes themselves.

:func:`run_case` loads one case with :func:`~astrovl.load_image` and classifies
the outcome: ``loaded``, ``refused`` (an astrovl error deriving from
``ValueError`` or ``OSError`` whose message names the file) or ``other`` (any
other exception, or an astrovl error that does not name the file).
``benchmarks/bench_fits_fuzz.py`` runs any number of cases and reports the
counts, the slow cases and the peak memory; ``tests/test_fits_robust.py`` runs a
few hundred.
"""

from __future__ import annotations

import gzip
import io
import re
import time
import tracemalloc
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["MUTATIONS", "FuzzCase", "FuzzResult", "seed_files", "fuzz_cases", "run_case"]

MUTATIONS = ("bitflip", "truncate", "card", "tile", "duplicate")

_BLOCK = 2880
_CARD = 80

# label -> path parts under the installed astropy package
_SEEDS = {
    "m13": ("io", "fits", "hdu", "compressed", "tests", "data", "m13.fits"),
    "m13_rice": ("io", "fits", "hdu", "compressed", "tests", "data", "m13_rice.fits"),
    "m13_gzip": ("io", "fits", "hdu", "compressed", "tests", "data", "m13_gzip.fits"),
    "m13_hcomp": ("io", "fits", "hdu", "compressed", "tests", "data", "m13_hcomp.fits"),
    "m13_plio": ("io", "fits", "hdu", "compressed", "tests", "data", "m13_plio.fits"),
    "ngc1316": ("io", "fits", "tests", "data", "comp.fits"),
    "dss": ("wcs", "tests", "data", "dss.14.29.56-62.41.05.fits.gz"),
    "acs": ("wcs", "tests", "data", "j94f05bgq_flt.fits"),
}

_INT_VALUES = ("0", "-1", "1", "2", "3", "999", "1000", "65536", "2147483647", "2147483648",
               "-2147483648", "9223372036854775807", "99999999999999999999999999", "1E10",
               "1.5", "'abc'", "T", "", "NAN")
_ABSURD = {
    "BITPIX": ("0", "7", "-16", "128", "-8", "64", "-64", "8", "'16'", "", "1E3"),
    "BSCALE": ("0", "1E308", "-1E308", "1E-308", "1E400", "NAN", "INF", "'x'", "-1", "1E38"),
    "BZERO": ("1E308", "-1E308", "1E400", "NAN", "'x'", "9223372036854775808", "32768"),
    "BLANK": ("0", "-32768", "99999999999999999999", "'x'", "1.5"),
    "CTYPE": ("'RA---XXX'", "'RA---TAB'", "''", "'DEC--TAN'", "12", "'GLON-CAR'",
              "'" + "X" * 60 + "'", "'RA---TAN-SIP'", "'FREQ'"),
    "ZCMPTYPE": ("'RICE_1'", "'GZIP_1'", "'GZIP_2'", "'HCOMPRESS_1'", "'PLIO_1'",
                 "'NOCOMPRESS'", "'BOGUS'", "''"),
}
_CARD_KEYS = re.compile(rb"^(NAXIS\d*|BITPIX|BSCALE|BZERO|BLANK|PCOUNT|GCOUNT|ZBITPIX|ZNAXIS\d*|"
                        rb"ZTILE\d+|CTYPE\d+|THEAP|TFORM\d+|ZCMPTYPE|EXTEND|ZIMAGE)$")
_ADDED = ("BSCALE", "BZERO", "BLANK", "CTYPE1", "ZTILE2")


@dataclass
class _Hdu:
    header: tuple[int, int]  # byte range of the header
    data: tuple[int, int]  # byte range of the data (declared, without padding)
    heap: tuple[int, int] | None  # byte range of the heap of a tile-compressed HDU
    table: tuple[int, int] | None  # byte range of its descriptor table


@dataclass
class _Seed:
    name: str
    suffix: str
    raw: bytes  # the bytes on disk
    stream: bytes  # the FITS stream (decompressed for .gz)
    gzipped: bool
    hdus: list[_Hdu]


@dataclass
class FuzzCase:
    """One mutated file.

    Attributes
    ----------
    index : int
        Position in the seeded sequence.
    seed : str
        Name of the real file it was made from.
    mutation : str
        One of :data:`MUTATIONS`.
    detail : str
        What was changed (offsets, card, value).
    data : bytes
        The file's bytes.
    suffix : str
        File name suffix to write it with (``.fits`` or ``.fits.gz``).
    """

    index: int
    seed: str
    mutation: str
    detail: str
    data: bytes = field(repr=False)
    suffix: str = ".fits"


@dataclass
class FuzzResult:
    """Outcome of loading one :class:`FuzzCase`.

    Attributes
    ----------
    case : FuzzCase
    outcome : str
        ``"loaded"``, ``"refused"`` or ``"other"``.
    seconds : float
        Wall time of :func:`~astrovl.load_image`.
    error : str
        ``"Type: message"`` of the exception, empty when loaded.
    peak_bytes : int
        Peak memory traced by :mod:`tracemalloc` during the load (0 when not traced).
    output_bytes : int
        Bytes of the loaded image's ``raw`` array (0 when refused).
    """

    case: FuzzCase
    outcome: str
    seconds: float
    error: str = ""
    peak_bytes: int = 0
    output_bytes: int = 0


def seed_files() -> list[tuple[str, Path]]:
    """The real FITS files used as seeds that are installed, as ``(name, path)`` pairs."""
    import astropy

    root = Path(astropy.__file__).parent
    out = []
    for name, parts in _SEEDS.items():
        path = root.joinpath(*parts)
        if path.is_file():
            out.append((name, path))
    return out


def _layout(stream: bytes) -> list[_Hdu]:
    from astropy.io import fits

    hdus = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fits.open(io.BytesIO(stream), disable_image_compression=True) as hdul:
            for i, hdu in enumerate(hdul):
                info = hdul.fileinfo(i)
                start, data_at = int(info["hdrLoc"]), int(info["datLoc"])
                size = int(hdu._data_size) if hasattr(hdu, "_data_size") else int(info["datSpan"])
                heap = table = None
                if hdu.header.get("ZIMAGE", False) is True:
                    nbytes = hdu.header["NAXIS1"] * hdu.header["NAXIS2"]
                    theap = hdu.header.get("THEAP", nbytes)
                    table = (data_at, data_at + nbytes)
                    heap = (data_at + theap, data_at + size)
                hdus.append(_Hdu((start, data_at), (data_at, data_at + size), heap, table))
    return hdus


def _load_seed(name: str, path: Path) -> _Seed:
    raw = path.read_bytes()
    gzipped = raw[:2] == b"\x1f\x8b"
    stream = gzip.decompress(raw) if gzipped else raw
    suffix = ".fits.gz" if gzipped else ".fits"
    return _Seed(name, suffix, raw, stream, gzipped, _layout(stream))


def _card(key: str, value: str) -> bytes:
    text = f"{key:<8}= {value:>20} / fuzzed" if value else f"{key:<8}="
    return text.encode("ascii", "replace")[:_CARD].ljust(_CARD)


def _header_cards(seed: _Seed) -> list[tuple[int, str]]:
    cards = []
    for hdu in seed.hdus:
        for pos in range(hdu.header[0], hdu.header[1], _CARD):
            key = seed.stream[pos:pos + 8].strip()
            if _CARD_KEYS.match(key):
                cards.append((pos, key.decode("ascii")))
    return cards


def _free_card_slots(seed: _Seed) -> list[int]:
    """Offsets of blank, COMMENT or HISTORY cards (places to add a card)."""
    out = []
    for hdu in seed.hdus:
        for pos in range(hdu.header[0], hdu.header[1], _CARD):
            key = seed.stream[pos:pos + 8].strip()
            if key in (b"", b"COMMENT", b"HISTORY"):
                out.append(pos)
    return out


def _absurd_value(key: str, rng: np.random.Generator) -> str:
    for prefix in ("CTYPE", "ZCMPTYPE", "BITPIX", "BSCALE", "BZERO", "BLANK"):
        if key.startswith(prefix) or (prefix == "BITPIX" and key == "ZBITPIX"):
            values = _ABSURD[prefix]
            break
    else:
        values = _INT_VALUES
    return str(values[rng.integers(len(values))])


def _flip_bits(buf: bytearray, rng, ranges: Sequence[tuple[int, int]] | None) -> str:
    flips = []
    for _ in range(int(rng.integers(1, 9))):
        lo, hi = (0, len(buf)) if not ranges else ranges[rng.integers(len(ranges))]
        if hi <= lo:
            lo, hi = 0, len(buf)
        pos = int(rng.integers(lo, hi))
        bit = int(rng.integers(8))
        buf[pos] ^= 1 << bit
        flips.append(f"{pos}:{bit}")
    return "bits " + ",".join(flips)


def _mutate(seed: _Seed, mutation: str, rng: np.random.Generator) -> tuple[bytes, str, bool]:
    """Mutated bytes, a description, and whether they are the compressed (on-disk) bytes."""
    on_disk = seed.gzipped and mutation in ("bitflip", "truncate") and rng.random() < 0.5
    buf = bytearray(seed.raw if on_disk else seed.stream)
    if mutation == "bitflip":
        headers = None if on_disk or rng.random() < 0.5 else [h.header for h in seed.hdus]
        return bytes(buf), _flip_bits(buf, rng, headers), on_disk
    if mutation == "truncate":
        cut = int(rng.integers(0, len(buf)))
        return bytes(buf[:cut]), f"truncated at {cut} of {len(buf)}", on_disk
    if mutation == "card":
        cards = _header_cards(seed)
        slots = _free_card_slots(seed)
        if slots and (not cards or rng.random() < 0.2):
            pos = slots[rng.integers(len(slots))]
            key = _ADDED[rng.integers(len(_ADDED))]
        else:
            pos, key = cards[rng.integers(len(cards))]
        value = _absurd_value(key, rng)
        buf[pos:pos + _CARD] = _card(key, value)
        return bytes(buf), f"card {key} = {value!r} at {pos}", False
    if mutation == "tile":
        regions = [r for h in seed.hdus for r in (h.heap, h.table) if r is not None and r[1] > r[0]]
        if not regions:
            regions = [h.data for h in seed.hdus if h.data[1] > h.data[0]] or [(0, len(buf))]
        lo, hi = regions[rng.integers(len(regions))]
        start = int(rng.integers(lo, hi))
        length = int(min(hi - start, rng.integers(1, 64)))
        style = rng.integers(3)
        if style == 0:
            buf[start:start + length] = bytes(length)
        elif style == 1:
            buf[start:start + length] = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
        else:
            buf[start:start + length] = b"\xff" * length
        kind = ("zeros", "random bytes", "0xff")[style]
        return bytes(buf), f"{kind} over {length} bytes at {start} (region {lo}-{hi})", False
    if mutation == "duplicate":
        nblocks = max(1, len(buf) // _BLOCK)
        first = int(rng.integers(nblocks))
        count = int(rng.integers(1, 4))
        block = bytes(buf[first * _BLOCK:(first + count) * _BLOCK])
        at = int(rng.integers(nblocks + 1)) * _BLOCK
        buf[at:at] = block
        return bytes(buf), f"blocks {first}..{first + count - 1} copied to {at}", False
    raise ValueError(f"unknown mutation {mutation!r}; choose from {MUTATIONS}")


def fuzz_cases(n: int, seed: int = 0, files: Sequence[tuple[str, Path]] | None = None
               ) -> Iterator[FuzzCase]:
    """Generate ``n`` seeded mutated FITS files.

    Parameters
    ----------
    n : int
        Number of cases.
    seed : int, optional
        Seed of the random generator: the same seed gives the same cases.
    files : sequence of (name, path), optional
        Seed files; default :func:`seed_files`.

    Yields
    ------
    FuzzCase
        Seeds and mutations taken in turn (case ``i`` uses seed ``i % len(files)``).
    """
    files = list(seed_files() if files is None else files)
    if not files:
        raise FileNotFoundError("no seed FITS file is installed (astropy's test data is missing)")
    seeds = [_load_seed(name, Path(path)) for name, path in files]
    rng = np.random.default_rng(seed)
    for i in range(n):
        s = seeds[i % len(seeds)]
        mutation = MUTATIONS[(i // len(seeds)) % len(MUTATIONS)]
        data, detail, on_disk = _mutate(s, mutation, rng)
        if s.gzipped and not on_disk:
            data = gzip.compress(data, compresslevel=1, mtime=0)
        yield FuzzCase(i, s.name, mutation, detail, data, s.suffix)


def run_case(case: FuzzCase, directory: str | Path, *, trace_memory: bool = False) -> FuzzResult:
    """Write ``case`` into ``directory`` and load it with :func:`~astrovl.load_image`.

    Parameters
    ----------
    case : FuzzCase
    directory : str or path-like
        Where the file is written (it is removed afterwards).
    trace_memory : bool, optional
        Measure the peak memory of the load with :mod:`tracemalloc` (slower).

    Returns
    -------
    FuzzResult
    """
    from ..exceptions import AstroVLError
    from .readers import load_image

    path = Path(directory) / f"fuzz{case.index:06d}{case.suffix}"
    path.write_bytes(case.data)
    outcome, error, output = "loaded", "", 0
    if trace_memory:
        tracemalloc.start()
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = load_image(path)
        output = int(img.raw.nbytes)
    except Exception as exc:  # classify every failure
        error = f"{type(exc).__name__}: {exc}"
        named = str(path) in str(exc)
        clean = isinstance(exc, AstroVLError) and isinstance(exc, (ValueError, OSError))
        outcome = "refused" if clean and named else "other"
    seconds = time.perf_counter() - start
    peak = 0
    if trace_memory:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    path.unlink(missing_ok=True)
    return FuzzResult(case, outcome, seconds, error, peak, output)
