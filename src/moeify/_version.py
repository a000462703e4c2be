"""The package version (one place; setup reads pyproject.toml)."""

__version__ = "0.1.0"
