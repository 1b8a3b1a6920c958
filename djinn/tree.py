"""Nested tuples, lists and dicts of values: what modules take and return."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def map_tree(tree: Any, fn: Callable[[Any], Any]) -> Any:
    """Apply `fn` to every leaf, keeping the containers' shape."""
    if isinstance(tree, tuple):
        return tuple(map_tree(item, fn) for item in tree)
    if isinstance(tree, list):
        return [map_tree(item, fn) for item in tree]
    if isinstance(tree, dict):
        return {key: map_tree(item, fn) for key, item in tree.items()}
    return fn(tree)
