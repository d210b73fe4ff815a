"""The layers of docs/architecture.rst: no module imports from a higher layer."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "docs" / "scripts" / "import_layers.py"

pytestmark = pytest.mark.skipif(not SCRIPT.is_file() or not (ROOT / "astrovl").is_dir(),
                                reason="needs the source tree (docs/scripts and astrovl/)")


@pytest.fixture(scope="module")
def layers():
    spec = importlib.util.spec_from_file_location("import_layers", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_source_tree_follows_the_layers(layers, capsys):
    assert layers.main(ROOT) == 0
    out = capsys.readouterr().out
    assert "no module imports from a higher layer" in out
    assert "cli -> clip" in " ".join(out.split())


def test_upward_import_is_reported(layers, tmp_path, capsys):
    root = _package(tmp_path, {
        "astrovl/__init__.py": "_LAZY = {'CLIPEmbedder': 'astrovl.clip'}\n",
        "astrovl/clip/__init__.py": "from ..imaging import load_image\n",
        "astrovl/imaging/__init__.py": "def f():\n    from astrovl import CLIPEmbedder\n",
        "astrovl_napari/__init__.py": "",
    })
    assert layers.main(root) == 1
    out = capsys.readouterr().out
    assert "astrovl.imaging (layer 1) imports astrovl.clip (layer 2)" in out
    assert "clip -> imaging" in " ".join(out.split())


def test_unlisted_sideways_import_is_reported(layers, tmp_path, capsys):
    root = _package(tmp_path, {
        "astrovl/__init__.py": "",
        "astrovl/datasets/records.py": "",
        "astrovl/llava/model.py": "from ..datasets.records import x\n",
        "astrovl_napari/__init__.py": "",
    })
    assert layers.main(root) == 1
    assert "astrovl.llava.model (layer 2) imports astrovl.datasets.records (layer 2)" in capsys.readouterr().out
