"""What a config node's class can do, read from the class its ``_target_`` names.

Heads declare ``frozen`` (a fixed classifier, the simplex ETF) and backbones a ``kind``
(mlp, vision, ufm): checks ask the class instead of matching its name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def capability(node: Mapping | Any, name: str, default: Any = None) -> Any:
    """A class attribute of the class ``node["_target_"]`` names; ``default`` where it names
    no importable class (the config's own check reports that)."""
    from hydra.utils import get_class

    try:
        return getattr(get_class(str(node.get("_target_", ""))), name, default)
    except Exception:
        return default
