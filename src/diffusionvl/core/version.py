"""The package version (one place: the facade, the server and `--version` read it here)."""

__version__ = "0.1.0"
