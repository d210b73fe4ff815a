# Sphinx configuration for astrovl.
import datetime
import os
import sys
from importlib.metadata import version as _version

from sphinx_astropy.conf.v2 import *  # noqa: F401,F403

project = "astrovl"
author = "The astrovl developers"
copyright = f"{datetime.datetime.now().year}, {author}"
release = _version("astrovl")
version = ".".join(release.split(".")[:2])

extensions += ["sphinx_automodapi.smart_resolver"]  # noqa: F405
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
html_title = f"astrovl {release}"
html_theme_options = {  # noqa: F405
    "github_url": "https://github.com/astrovl/astrovl",
    "use_edit_page_button": False,
}
intersphinx_mapping.update({  # noqa: F405
    "torch": ("https://pytorch.org/docs/stable/", None),
})
# the documentation is built offline: do not fetch inventories
intersphinx_mapping = {}
nitpicky = False
automodapi_toctreedirnm = "api"
automodsumm_inherited_members = False
numpydoc_show_class_members = False
suppress_warnings = ["config.cache"]
sys.path.insert(0, os.path.abspath("."))
