"""Sphinx configuration of the docs site (``make docs``): Markdown pages read by MyST, warnings
(a broken link or anchor among them) fail the build."""

project = "torchwire"
author = "the torchwire authors"
extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3  # links such as [x](deployment.md#replicas-behind-nginx) are checked
myst_enable_extensions = ["colon_fence"]
html_theme = "alabaster"
html_theme_options = {"description": "PyTorch models over gRPC and HTTP, from Python"}
html_title = "torchwire"
suppress_warnings: list[str] = []
