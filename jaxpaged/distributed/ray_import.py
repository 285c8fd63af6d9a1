"""Ray is an optional extra: import it, or say how to get it."""

from __future__ import annotations

from types import ModuleType

INSTALL_HINT = 'pip install "jaxpaged[ray]"'


class RayNotInstalledError(ImportError):
    """Ray is needed and missing (the CLI prints the message, no traceback)."""


def import_ray(why: str) -> ModuleType:
    """``ray``, or RayNotInstalledError naming what needed it and the install command."""
    try:
        import ray
    except ImportError as e:
        raise RayNotInstalledError(f"{why} needs Ray, which is not installed: "
                                   f"{INSTALL_HINT}") from e
    return ray
