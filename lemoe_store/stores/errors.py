"""Errors of the store; each message is one line a user can act on."""

from ..errors import StoreError

__all__ = ["AmbiguousRevisionError", "BadNameError", "BadRevisionError", "CorruptObjectError", "LockTimeoutError",
           "NotAStoreError", "RefConflictError", "StoreError"]


class NotAStoreError(StoreError):
    pass


class BadRevisionError(StoreError):
    pass


class AmbiguousRevisionError(BadRevisionError):
    """A short commit id that more than one commit starts with."""


class BadNameError(StoreError):
    pass


class CorruptObjectError(StoreError):
    pass


class RefConflictError(StoreError):
    """A compare-and-swap ref update found a value other than the expected one."""


class LockTimeoutError(StoreError):
    pass
