"""hsr_lib: the library behind the HSR reproduction notebooks (arXiv 2505.16104)."""

__version__ = "0.1.0"
