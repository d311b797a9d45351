"""Recipes: YAML -> typed models, overrides, defaults resolution."""
