"""The package version: one place, read by pyproject.toml (scikit-build-core's regex provider) too."""

__version__ = "0.1.0"
