"""Errors raised by implicit_hooks. Each message says what is wrong and what to do."""


class ImplicitHooksError(Exception):
    """Base class of every error this package raises on purpose."""


class UnsupportedModelError(ImplicitHooksError, TypeError):
    """The model holds no block that a registered patcher supports."""


class RecordingError(ImplicitHooksError, RuntimeError):
    """A record cannot be turned into a view: incomplete call, freed data, weights changed."""


class UnsupportedInputError(ImplicitHooksError, ValueError):
    """The block was called in a way whose maths the view cannot express exactly."""
