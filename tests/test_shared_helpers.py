"""The package-wide helpers: image inputs and suffixes, the cache directory, the LRU cache, retries."""

from pathlib import Path

import numpy as np
import pytest

from astrovl import conf
from astrovl.config import cache_path
from astrovl.datasets._builder import retry
from astrovl.exceptions import DatasetError
from astrovl.imaging import FITS_SUFFIXES
from astrovl.imaging.inputs import (
    IMAGE_SUFFIXES,
    PICTURE_SUFFIXES,
    as_image_list,
    describe_input,
    has_fits_signature,
    is_fits_name,
    is_image_name,
)
from astrovl.imaging.readers import PICTURE_SUFFIXES as READER_PICTURE_SUFFIXES
from astrovl.utils.lru import LRUCache


def test_suffixes_are_defined_once():
    import astrovl.serve.images as serve_images
    from astrovl.imaging.inputs import PATH_COLUMNS

    assert READER_PICTURE_SUFFIXES is PICTURE_SUFFIXES
    assert IMAGE_SUFFIXES == FITS_SUFFIXES + PICTURE_SUFFIXES
    assert serve_images.PATH_COLUMNS is PATH_COLUMNS


def test_light_modules_stay_light():
    """The shared input module does not make the CLIP, index and napari modules import the imaging layer."""
    import subprocess
    import sys

    code = ("import sys, astrovl.clip.embedder, astrovl.clip.index, astrovl_napari._results, astrovl.datasets; "
            "print('astrovl.imaging' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(("name", "fits", "image"), [
    ("a/b/m13.fits", True, True), ("M13.FITS.GZ", True, True), ("x.fits.fz", True, True),
    ("x.fz", True, True), ("x.png", False, True), ("x.JPEG", False, True), ("x.webp", False, True),
    ("x.txt", False, False), ("fits", False, False), ("x.fits/notes.txt", False, False),
])
def test_file_name_tests(name, fits, image):
    assert is_fits_name(name) is fits
    assert is_image_name(Path(name)) is image


def test_fits_signature(tmp_path):
    (tmp_path / "a.dat").write_bytes(b"SIMPLE  =                    T")
    (tmp_path / "b.dat").write_bytes(b"\x89PNG\r\n")
    assert has_fits_signature(tmp_path / "a.dat")
    assert not has_fits_signature(tmp_path / "b.dat")
    assert not has_fits_signature(tmp_path / "missing.fits")  # unreadable: not FITS here
    assert not has_fits_signature(tmp_path)  # a directory


def test_as_image_list_and_describe_input(tmp_path):
    class Dataset:
        image_paths = [tmp_path / "a.png", tmp_path / "b.fits"]

    assert as_image_list(Dataset()) == ([str(tmp_path / "a.png"), str(tmp_path / "b.fits")], False)
    arr = np.zeros((3, 4))
    items, single = as_image_list(arr)
    assert single and len(items) == 1 and items[0] is arr
    assert as_image_list(["a.fits", "b.fits"]) == (["a.fits", "b.fits"], False)
    assert as_image_list(("a.fits", "b.fits")) == (["a.fits", "b.fits"], False)  # not a (data, header) pair
    with pytest.raises(TypeError, match="int"):
        as_image_list(3)
    assert describe_input(tmp_path / "a.png") == str(tmp_path / "a.png")
    assert describe_input(arr) == "<ndarray (3, 4)>"
    assert describe_input(3.0) == "<float>"


def test_cache_path(tmp_path):
    from astropy.config import get_cache_dir_path

    with conf.set_temp("cache_dir", str(tmp_path)):
        assert cache_path() == tmp_path
        assert cache_path("models", "gemma3-270m") == tmp_path / "models" / "gemma3-270m"
        assert not (tmp_path / "models").exists()  # nothing is created below the cache directory
    with conf.set_temp("cache_dir", ""):
        assert cache_path("converted-llava") == Path(get_cache_dir_path("astrovl")) / "converted-llava"


def test_cache_users_share_the_directory(tmp_path):
    from astrovl.llava.convert import _cache_root
    from astrovl.serve.images import default_thumbnail_cache

    with conf.set_temp("cache_dir", str(tmp_path)):
        assert default_thumbnail_cache() == tmp_path / "serve-thumbnails"
        assert _cache_root() == tmp_path / "converted-llava"


def test_lru_cache_drops_the_least_recently_used():
    cache = LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "b" is now the oldest
    cache.put("c", 3)
    assert (cache.get("a"), cache.get("b"), cache.get("c"), len(cache)) == (1, None, 3, 2)
    cache.clear()
    assert len(cache) == 0 and cache.get("a", "gone") == "gone"
    off = LRUCache(0)
    off.put("a", 1)
    assert len(off) == 0


def test_retry_cleans_up_after_every_failure(monkeypatch):
    import astrovl.datasets._builder as builder

    sleeps, cleaned, calls = [], [], []
    monkeypatch.setattr(builder.time, "sleep", sleeps.append)

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError(f"failure {len(calls)}")
        return "ok"

    assert retry(flaky, attempts=3, delay=0.5, what="x", cleanup=lambda: cleaned.append(1)) == "ok"
    assert sleeps == [0.5, 1.0] and len(cleaned) == 2

    def broken_cleanup():
        raise RuntimeError("cleanup errors are ignored")

    with pytest.raises(DatasetError, match="the query failed after 2 attempt") as info:
        retry(lambda: 1 / 0, attempts=2, delay=0.0, what="the query", cleanup=broken_cleanup)
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_no_module_imports_another_modules_private_names():
    import ast

    import astrovl
    import astrovl_napari

    found = []
    for package in (astrovl, astrovl_napari):
        root = Path(package.__file__).parent
        for path in sorted(root.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not isinstance(node, ast.ImportFrom) or node.module == "__future__":
                    continue
                if node.level == 0 and not (node.module or "").startswith("astrovl"):
                    continue  # another package's names are its own business
                found += [f"{path.relative_to(root.parent)}:{node.lineno} {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert found == []


def test_is_within_follows_links_and_dotdot(tmp_path):
    from astrovl.utils.files import is_within

    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "link").symlink_to(tmp_path / "outside")
    assert is_within(root, root) and is_within(root / "sub" / "a.fits", root)
    assert not is_within(root / ".." / "outside", root)
    assert not is_within(root / "link" / "a.fits", root)  # a link out of the root


def test_locate_image_file_tries_the_image_root_first(tmp_path, monkeypatch):
    from astrovl.imaging.inputs import locate_image_file

    root, index_dir = tmp_path / "images", tmp_path / "work" / "index"
    root.mkdir()
    index_dir.mkdir(parents=True)
    (root / "m13.fits").write_bytes(b"root")
    (index_dir / "m13.fits").write_bytes(b"index")
    monkeypatch.chdir(tmp_path)
    assert locate_image_file("m13.fits[1]", index_dir=index_dir, image_root=root) == (root / "m13.fits").resolve()
    assert locate_image_file("m13.fits", index_dir=index_dir) == (index_dir / "m13.fits").resolve()
    assert locate_image_file(str(root / "m13.fits")) == (root / "m13.fits").resolve()
    assert locate_image_file("bad\x00name.fits", index_dir=index_dir) is None
    assert locate_image_file("<ndarray (3, 3)>", index_dir=index_dir) is None
    assert locate_image_file("nowhere.fits", index_dir=index_dir, image_root=root) is None
