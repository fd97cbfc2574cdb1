"""The package version (one place: lavae_fast.__version__ and setup.py read it)."""

__version__ = "0.1.0"
