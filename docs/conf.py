"""Sphinx configuration of the desomdb documentation (built offline: ``sphinx-build -W``).

The build generates three reference pages before reading the sources
(:mod:`desomdb_refs`): the job-file keys from the pydantic models that validate job files,
the views and their columns from ``sql/schema.yml``, and executes ``tutorial.ipynb`` (myst-nb)
on a tiny archive the notebook makes, so none of them can go stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "_ext"))

from desomdb import __version__  # noqa: E402

project = "desomdb"
author = "the desomdb developers"
copyright = "2026, the desomdb developers"
release = __version__
version = __version__

extensions = [
    "myst_nb",  # Markdown (MyST) pages and executed notebooks
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "numpydoc",
    "sphinx_click",
    "desomdb_refs",
]

exclude_patterns = ["_build", "jupyter_execute", "**.ipynb_checkpoints", "_generated/*.md"]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb", ".rst": "restructuredtext"}
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# Offline: no intersphinx inventories are fetched; links to other projects are plain URLs.
autosummary_generate = True
autodoc_default_options = {"members": True, "undoc-members": False}
autodoc_typehints = "none"  # the numpydoc sections give the types
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_validation_checks: set[str] = set()

nb_execution_mode = "force"  # the tutorial runs at every build
nb_execution_timeout = 900
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_output_stderr = "remove"  # tqdm's notebook notice; an error still fails the build

html_theme = "pydata_sphinx_theme"
html_title = f"desomdb {version}"
html_static_path: list[str] = []
html_theme_options = {
    "navigation_depth": 2,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
}
html_sidebars: dict[str, list[str]] = {"**": ["sidebar-nav-bs"]}
