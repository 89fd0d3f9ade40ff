"""Where the plugin keeps what it derives once per machine (the ICD-10-CM index, the Spark JVM's class archive).

Everything here can be deleted at any time: it is rebuilt from its source on the
next use.  ``$FHIR_PLUGIN_CACHE`` names the folder, else ``$XDG_CACHE_HOME/fhir-plugin``,
else ``~/.cache/fhir-plugin``.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """The cache folder (not created here)."""
    explicit = os.environ.get("FHIR_PLUGIN_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fhir-plugin"
