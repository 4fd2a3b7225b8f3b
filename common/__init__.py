"""Shared infrastructure for the six method scripts (see DESIGN.md: never method-specific)."""
