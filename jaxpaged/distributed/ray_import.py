"""Ray is an optional extra: import it, or say how to get it."""

from __future__ import annotations

from types import ModuleType

INSTALL_HINT = 'pip install "jaxpaged[ray]"'


def import_ray(why: str) -> ModuleType:
    """``ray``, or an ImportError naming what needed it and the install command."""
    try:
        import ray
    except ImportError as e:
        raise ImportError(f"{why} needs Ray, which is not installed: {INSTALL_HINT}") from e
    return ray
