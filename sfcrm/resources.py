"""Files shipped with sfcrm: templates and the example configuration.

In an installed wheel they live inside the package; in a source checkout they are read from the
repository's top-level ``templates/`` and ``sfcrm.toml.example``.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_CHECKOUT = _PACKAGE.parent


def templates_dir(override: Path | None = None) -> Path:
    if override is not None:
        return override
    packaged = _PACKAGE / "templates"
    return packaged if packaged.is_dir() else _CHECKOUT / "templates"


def template_path(name: str, override: Path | None = None) -> Path:
    """A template by name: the override folder's copy when it has one, else the built-in."""
    if override is not None and (override / name).is_file():
        return override / name
    return templates_dir() / name


def example_config() -> Path:
    packaged = _PACKAGE / "data" / "sfcrm.toml.example"
    return packaged if packaged.is_file() else _CHECKOUT / "sfcrm.toml.example"
