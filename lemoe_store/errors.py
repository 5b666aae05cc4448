"""Every error a user can act on derives from `LemoeError`; its message is one line saying what to do.

The CLI prints a `LemoeError` as one red line and exits 1. Any other exception is a bug and keeps its
traceback. This module imports nothing, so every layer (stores, editing, schemas, serve) can use it.
"""


class LemoeError(Exception):
    """Base class of user-facing errors."""


class StoreError(LemoeError):
    """Anything wrong with a store, a revision or a request to it (see `lemoe_store.stores.errors`)."""


class FactsError(LemoeError, ValueError):
    """Invalid facts: the message names the file, the line and the field."""


class ModelError(LemoeError):
    """A base model that cannot be found, loaded, adapted or matched to a store."""


class ConfigError(LemoeError, ValueError):
    """Settings that cannot work together (an unknown plan, a layer outside the model, ...)."""


class BenchError(LemoeError, ValueError):
    """A benchmark run that cannot go on as asked (a results file or checkpoint that other code wrote)."""
