"""The engine's typed errors. Hot paths return values; edges raise these."""

from __future__ import annotations

from engine.codes import HANDLER_ERROR
from persistence.errors import StartupError as _StartupError


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""


class ConfigError(EngineError, ValueError):
    """An option has a bad value; the message names the field and the value."""

    def __init__(self, field: str, value: object, why: str) -> None:
        super().__init__(f"{field}={value!r}: {why}")
        self.field = field
        self.value = value


class NotRuntimeConfigurable(ConfigError):
    """The option can only change with a restart."""


class HandlerError(EngineError):
    """A handler refused an intent; the intent is dead-lettered with this reason."""

    code = HANDLER_ERROR


# The engine could not start (database, socket, workers); says which.
# Defined by persistence, which raises it too and must not import the engine.
StartupError = _StartupError


class ClientError(EngineError):
    """The client could not reach the engine or the engine closed on it."""
