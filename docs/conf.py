"""Sphinx configuration of pitmpi's documentation (``sphinx-build -W -b html docs docs/_build/html``)."""
import os
import sys

sys.path.insert(0, os.path.abspath(".."))
from pitmpi import __version__, config  # noqa: E402

project = "pitmpi"
author = "the pitmpi developers"
copyright = "2026, the pitmpi developers"
version = release = __version__

extensions = ["myst_parser", "sphinx.ext.autodoc", "numpydoc", "sphinx.ext.mathjax"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "_generated"]
myst_heading_anchors = 3
numpydoc_show_class_members = False
numpydoc_validation_checks = set()
autodoc_member_order = "bysource"
html_theme = "alabaster"
html_static_path = ["_static"]
html_theme_options = {"description": "layer-parallel training of ResNets with MPI",
                      "fixed_sidebar": True}

# the configuration reference comes from the schema itself, so it cannot drift
_generated = os.path.join(os.path.dirname(__file__), "_generated")
os.makedirs(_generated, exist_ok=True)
with open(os.path.join(_generated, "keys.md"), "w") as f:
    f.write(config.describe() + "\n")
