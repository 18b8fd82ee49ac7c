"""The package version (a leaf module: tracking tags it on every run without importing the package facade)."""

__version__ = "0.1.0"
