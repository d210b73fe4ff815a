import subprocess
import sys


def test_import_is_light():
    code = (
        "import sys, astrovl; "
        "heavy = [m for m in ('torch', 'transformers', 'open_clip', 'outlines', 'faiss', 'napari') "
        "if m in sys.modules]; print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_public_names_resolve():
    import importlib

    import astrovl

    for name, module in (("load_image", "astrovl.imaging"), ("AstroImage", "astrovl.imaging"),
                         ("make_rgb", "astrovl.imaging"), ("cutout", "astrovl.imaging"),
                         ("conf", "astrovl.config")):
        assert getattr(astrovl, name) is getattr(importlib.import_module(module), name), name
    assert "load_image" in astrovl.__all__


def test_conf_defaults():
    from astrovl import conf

    assert conf.clip_model == "openai/clip-vit-base-patch16"  # HubbleCLIP's base model
    assert conf.clip_pretrained == ""
    assert conf.device == "auto"
    import torch

    from astrovl.utils.devices import resolve_device

    # the setting reaches the code that places models, and is undone after the block
    with conf.set_temp("device", "meta"):
        assert resolve_device() == torch.device("meta")
    assert resolve_device() == torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_cli_version_and_help():
    from astrovl import __version__

    out = subprocess.run([sys.executable, "-m", "astrovl.cli", "--version"], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == f"astrovl {__version__}"
    out = subprocess.run([sys.executable, "-m", "astrovl.cli", "--help"], capture_output=True,
                         text=True, check=True)
    assert "usage: astrovl" in out.stdout
