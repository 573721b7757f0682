"""A module's fields <-> the config.json of the diffusers / transformers model it mirrors.

Where the config keys are the field names (or a few renames of them), a module reads and writes its
config through these two functions instead of listing every field twice.
"""

import dataclasses
from typing import Any

import flax.linen as nn


def _fields(cls: type[nn.Module], skip: tuple[str, ...]) -> list[dataclasses.Field]:
    # Flax adds `parent` and `name` to every module's dataclass fields.
    return [f for f in dataclasses.fields(cls) if f.name not in ('parent', 'name', *skip)]


def read_fields(
    cls: type[nn.Module],
    cfg: dict,
    *,
    skip: tuple[str, ...] = (),
    renames: dict[str, str] | None = None,
    defaults: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`cls`'s fields but `skip`, as keyword arguments, from a config dict. Field f is read from key
    renames[f] (default f); a missing key gives defaults[f] (the library's default, where it is not the
    field's own), else the field's default. Keys that are no field are ignored."""
    renames, defaults = renames or {}, defaults or {}
    return {f.name: cfg.get(renames.get(f.name, f.name), defaults.get(f.name, f.default)) for f in _fields(cls, skip)}


def write_fields(module: nn.Module, *, skip: tuple[str, ...] = (), renames: dict[str, str] | None = None) -> dict:
    """The inverse of `read_fields`: {key: value} of `module`'s fields but `skip`, in declaration order."""
    renames = renames or {}
    return {renames.get(f.name, f.name): getattr(module, f.name) for f in _fields(type(module), skip)}
