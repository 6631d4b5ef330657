"""Configuration: the typed recipe, its loading and overrides, the shipped recipes, options objects."""
