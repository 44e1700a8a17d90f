"""Errors of the persistence layer (which imports nothing from the engine)."""

from __future__ import annotations


class StartupError(Exception):
    """A database could not be started or reached at startup; says which.
    ``engine.errors.StartupError`` is this class: one type for every
    "could not start", wherever it was raised."""
