"""Converters between compiled graphs and other engines' checkpoint formats."""
