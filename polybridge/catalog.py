"""The catalog of implementations: which names a registry entry may use, and the class behind each.

A registry entry names its backbone's ``architecture`` and its branch's ``type``; this module is the one place
where those names are listed. It sits at the registry's layer and imports nothing heavy: each name maps to
the import path of its class (``"module:Class"``), imported on first use by :func:`resolve`. A new branch type,
backbone family or (later) plugin kind is one module plus one :func:`register` call (or one line in the tables
below for the built-in ones).

>>> sorted(names("branch"))
['bdm', 'pea']
>>> family_of_architecture("sd1")
'sd'
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any

#: kind -> name -> the class (once resolved) or its import path "module:Class".
_TABLES: dict[str, dict[str, Any]] = {
    "branch": {
        "bdm": "polybridge.branches.bdm:BDMBranch",
        "pea": "polybridge.branches.pea:PEABranch",
    },
    "backbone_family": {
        "sd": "polybridge.backbones.sd:SDFamily",
        "sdxl": "polybridge.backbones.sdxl:SDXLFamily",
    },
}

#: What a registry backbone's ``architecture`` may say, and the family that loads it. ``sd1`` and ``sd2`` are the
#: names entries have always used for the ``sd`` family (Stable Diffusion 1.x / 2.x share one UNet layout family).
ARCHITECTURES: dict[str, str] = {"sd": "sd", "sd1": "sd", "sd2": "sd", "sdxl": "sdxl"}

_WHAT = {"branch": "branch type", "backbone_family": "backbone family"}


class UnknownName(LookupError):
    """A name that is not in the catalog; the message lists the valid ones."""


def names(kind: str) -> tuple[str, ...]:
    """The registered names of ``kind`` (``branch``, ``backbone_family``), in registration order."""
    return tuple(_TABLES[kind])


def family_of_architecture(architecture: str) -> str:
    """The backbone family that loads a registry ``architecture`` value."""
    try:
        return ARCHITECTURES[architecture]
    except KeyError:
        raise UnknownName(f"unknown architecture {architecture!r}{suggest(architecture, ARCHITECTURES)}; "
                          f"valid: {', '.join(ARCHITECTURES)}") from None


def register(kind: str, name: str, cls: Any) -> None:
    """Make ``cls`` the implementation of ``name``. Registering a name again with another class is an error."""
    table = _TABLES[kind]
    current = table.get(name)
    if current is not None and current is not cls and not (isinstance(current, str) and current == _path(cls)):
        held = current.rpartition(":")[2] if isinstance(current, str) else current.__name__
        raise ValueError(f"{_WHAT[kind]} {name!r} is already registered to {held}")
    table[name] = cls


def resolve(kind: str, name: str) -> Any:
    """The class registered as ``name``; an unknown name lists the valid ones."""
    table = _TABLES[kind]
    if name not in table:
        raise UnknownName(f"unknown {_WHAT[kind]} {name!r}{suggest(str(name), table)}; "
                          f"valid: {', '.join(table) or '(none)'}")
    target = table[name]
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = table[name] = getattr(importlib.import_module(module), attr)
    return target


def suggest(value: str, valid: Any) -> str:
    """`` (did you mean 'x'?)`` for the closest valid value, or ``""``."""
    close = difflib.get_close_matches(str(value), [str(v) for v in valid], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _path(cls: Any) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"
