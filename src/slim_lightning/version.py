"""The package version (one place: the package face, the resume fingerprint and slim.json read it)."""

__version__ = "0.1.0"
