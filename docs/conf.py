"""Sphinx configuration of the rendered book (built by scripts/build_book.py; see the README).

The notebooks arrive already executed (papermill), so myst-nb only renders them. Everything the pages need is
served from the build folder; MathJax alone comes from its CDN when the reader is online (offline, TeX shows)."""

project = "cl-lab"
author = "cl-lab maintainers"
copyright = "cl-lab maintainers"
extensions = ["myst_nb"]
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
html_theme = "sphinx_book_theme"
html_title = "cl-lab — continual learning, hands-on"
html_theme_options = {
    "show_toc_level": 2,
    "home_page_in_toc": True,
    "use_download_button": True,
    "repository_url": "",
}
html_css_files = ["claims.css"]
html_static_path = ["_static"]
nb_execution_mode = "off"  # executed beforehand, with the parameters the build asked for
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "html_image"]
myst_heading_anchors = 3
suppress_warnings = ["mystnb.unknown_mime_type", "myst.header"]
