"""Exceptions of the engine; each message names the problem and what to do."""

from __future__ import annotations


class DSDError(Exception):
    """Base class of every error the engine raises on purpose."""


class ConfigError(DSDError, ValueError):
    """An invalid network, DSD or training configuration."""


class InputError(DSDError, ValueError):
    """An input (volume, label, tensor) that cannot be processed."""


def read_json(path, error: type[DSDError] = InputError, what: str | None = None):
    """Parse a JSON file; a syntax error becomes ``error`` naming the file."""
    import json
    from pathlib import Path

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise error(f"{what or path} is not valid JSON: {e}") from e


class Cancelled(Exception):
    """A run stopped because its caller asked (not an error of the input: never shown as one)."""
