"""Widgets of the terminal app, one family per module."""
