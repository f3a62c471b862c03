"""The package version, read by pyproject.toml and stamped on telemetry (tags, scope version)."""

__version__ = "0.1.0"
