"""Recipes: YAML + dotted overrides -> one checked `Recipe` of per-section dataclasses."""

from .loader import ConfigError, load_recipe, recipe_container, recipe_hash, to_yaml
from .schema import SECTIONS, Recipe

__all__ = ["SECTIONS", "ConfigError", "Recipe", "load_recipe", "recipe_container", "recipe_hash", "to_yaml"]
