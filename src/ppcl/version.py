"""The ppcl version (written into every artefact's provenance; pyproject.toml carries the same string)."""

__version__ = "0.1.0"
