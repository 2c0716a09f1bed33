"""slimline: model compression and compilation with measured, checked results."""

__version__ = "0.1.0"
