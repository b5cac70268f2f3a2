"""Exceptions of the engine; each message names the problem and what to do."""


class DSDError(Exception):
    """Base class of every error the engine raises on purpose."""


class ConfigError(DSDError, ValueError):
    """An invalid network, DSD or training configuration."""


class InputError(DSDError, ValueError):
    """An input (volume, label, tensor) that cannot be processed."""
