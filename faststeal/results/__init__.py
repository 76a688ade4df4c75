"""Results store (SQLite) and the report built from it (tables, figures)."""

from .store import ResultStore, StoreMismatchError, config_hash

__all__ = ["ResultStore", "StoreMismatchError", "config_hash"]
