"""YAML recipes and dotted overrides as nested dicts: reading a recipe over its ``base:``,
parsing ``a.b=v`` overrides, and laying one over another. The typed checks come after
(:mod:`dataio.schema`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dataio.errors import ConfigError


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """Put ``value`` at ``a.b.c`` in the nested dict ``tree``, making sections as needed."""
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """``["optim.lr=0.1", "train.resume=auto"]`` -> nested dict (values parsed as YAML)."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        set_dotted(tree, key.strip(), value)
    return tree


def merge_trees(base: dict, extra: dict) -> dict:
    """``extra`` over ``base``, section by section: nested mappings merge key by key; any
    other value, an empty mapping or null included, replaces (``augment: {}``: no chain).
    The keys come in ``extra``'s order where it names several, the base's keys it does not
    name keep their places (:func:`merged_order`): a recipe can put a new op before the
    base's ops, or reorder them, as it lists them."""
    out = {}
    for key in merged_order(list(base), list(extra)):
        value = extra.get(key, base.get(key))
        if key in extra and isinstance(value, dict) and value and isinstance(base.get(key), dict):
            value = merge_trees(base[key], value)
        out[key] = value
    return out


def merged_order(base: list, extra: list) -> list:
    """The keys of ``base`` and ``extra`` in one order that keeps ``extra``'s order and,
    for the keys only ``base`` has, the base's: each base key ``extra`` names brings the
    keys ``extra`` lists before it. ``[gain, rrc, pitch]`` + ``[speed, gain]`` -> ``[speed,
    gain, rrc, pitch]``; + ``[pitch]`` -> unchanged; + ``[rrc, gain]`` -> ``[rrc, gain, pitch]``."""
    out, seen = [], set()
    for key in base:
        for k in extra[:extra.index(key) + 1] if key in extra else [key]:
            if k not in seen:
                out.append(k)
                seen.add(k)
    return out + [k for k in extra if k not in seen]


def _is_file(path: Path) -> bool:
    """``path.is_file()``, False for a name the file system refuses (too long)."""
    try:
        return path.is_file()
    except OSError:
        return False


def _is_dir(path: Path) -> bool:
    """``path.is_dir()``, False for a name the file system refuses (too long)."""
    try:
        return path.is_dir()
    except OSError:
        return False


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not _is_file(path):
        raise ConfigError(f"config {path} is a folder, not a YAML file" if _is_dir(path) else
                          f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid YAML: {getattr(err, 'problem', None) or err}{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def read_recipe(path: str | Path, below: tuple[Path, ...] = ()) -> dict:
    """The YAML at ``path`` merged over the recipe its top-level ``base:`` names (a path
    relative to its folder; a base may have its own), without the ``base`` key. ``below``:
    the files already on the way (a circle is an error)."""
    path = Path(path)
    tree = read_yaml(path)
    if "base" not in tree:
        return tree
    name = tree.pop("base")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{path}: base: expected the file name of a recipe, got {name!r}")
    parent, chain = path.parent / name, (*below, path)
    if not _is_file(parent):
        raise ConfigError(f"{path}: base {parent} is a folder, not a YAML file" if _is_dir(parent) else
                          f"{path}: base file not found: {parent}")
    if parent.resolve() in {p.resolve() for p in chain}:
        raise ConfigError(f"{path}: base {name} leads back to itself: {' -> '.join(map(str, (*chain, parent)))}")
    return overlay(read_recipe(parent, chain), tree)


def overlay(tree: dict, layer: dict) -> dict:
    """``layer`` over ``tree`` (:func:`merge_trees`, a key of an either-or pair replacing the other)."""
    return merge_trees(_drop_replaced(tree, layer), layer)


# Keys that say the same thing two ways: a later layer (a recipe over its base or the
# defaults, an override over the recipe) that sets one replaces the other, so
# ``data.sources=[...]`` on the command line trains on those corpora instead of the
# recipe's ``data.shards``.
EITHER_OR = (("data", "shards", "sources"),)


def _drop_replaced(tree: dict, layer: dict) -> dict:
    """``tree`` without the earlier value of a pair ``layer`` sets one of (both set in one
    layer stay, for the config check to refuse)."""
    for section, *keys in EITHER_OR:
        given, earlier = layer.get(section), tree.get(section)
        if isinstance(given, dict) and isinstance(earlier, dict) and sum(bool(given.get(k)) for k in keys) == 1:
            tree = {**tree, section: {k: v for k, v in earlier.items() if k not in keys}}
    return tree
