"""A results store that loses nothing: one SQLite database (WAL mode) per run folder.

One row per finished cell (method, seed, member count, ...) written in a single transaction with
its per-iteration diversity trace, a study-specific JSON ``payload`` and the config hash, so a
killed run keeps every finished cell and a rerun skips them. ``results.json/csv/md`` are exports
of this database (:mod:`faststeal.runs`). Several processes may write one store: SQLite serialises
the transactions (``busy_timeout``), and each cell is an atomic insert.

Every row carries a SHA-256 ``digest`` of its content (columns, payload and trace rows); reading
a row whose content no longer matches its digest raises :class:`StoreCorruptError` naming the
cell, so a hand-edited or damaged row is never reported as a result. Databases of schema
version 1 (no payload, no digest) are upgraded in place when opened for writing.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from typing import Any, Iterable, Optional, Sequence

SCHEMA_VERSION = 2
DB_NAME = "results.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cells (
    cell_id TEXT PRIMARY KEY, kind TEXT NOT NULL, method TEXT NOT NULL, seed INTEGER NOT NULL,
    members INTEGER, config_hash TEXT NOT NULL, metrics TEXT NOT NULL, hparams TEXT NOT NULL,
    seconds REAL NOT NULL, finished_at REAL NOT NULL, payload TEXT NOT NULL DEFAULT '{}',
    digest TEXT);
CREATE TABLE IF NOT EXISTS traces (
    cell_id TEXT NOT NULL, iteration INTEGER NOT NULL, epoch REAL, variance REAL,
    mutual_info REAL, disagreement REAL, PRIMARY KEY (cell_id, iteration));
"""


class StoreMismatchError(RuntimeError):
    """The database belongs to another configuration, another schema, or is not a database."""


class StoreCorruptError(StoreMismatchError):
    """A row's content does not match the digest written with it (edited or damaged)."""


_CELL_COLUMNS = ("cell_id, kind, method, seed, members, config_hash, metrics, hparams, seconds, "
                 "payload")
_TRACE_COLUMNS = "iteration, epoch, variance, mutual_info, disagreement"


def _row_digest(row: Sequence[Any], trace_rows: Sequence[Sequence[Any]]) -> str:
    """SHA-256 of a cell row (the ``_CELL_COLUMNS`` values as stored) and its trace rows."""
    blob = json.dumps([list(row), [list(t) for t in trace_rows]], default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def config_hash(config: dict[str, Any]) -> str:
    """Stable short hash of the result-affecting configuration."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class ResultStore:
    """The run folder's database. ``ResultStore(dir, config)`` opens or creates it.

    A store created for one configuration refuses another (``StoreMismatchError``) unless
    ``force=True``, which discards the old cells. ``config=None`` opens read-only style (report).
    """

    def __init__(self, directory: str, config: Optional[dict[str, Any]] = None,
                 force: bool = False) -> None:
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, DB_NAME)
        try:
            self.conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA busy_timeout=60000")
            self.conn.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise StoreMismatchError(f"{self.path} is not a faststeal results database ({exc}); "
                                     "move it away or choose another --out") from exc
        version = self.get_meta("schema_version")
        if version is None:
            self.set_meta("schema_version", SCHEMA_VERSION)
        elif int(version) == 1:
            self._upgrade_from_v1()
        elif int(version) != SCHEMA_VERSION:
            raise StoreMismatchError(f"{self.path} has schema version {version}, this faststeal "
                                     f"writes {SCHEMA_VERSION}")
        self.config_hash: Optional[str] = None
        if config is not None:
            self.config_hash = config_hash(config)
            stored = self.get_meta("config_hash")
            if stored is not None and stored != self.config_hash:
                if not force:
                    raise StoreMismatchError(
                        f"{self.path} holds results of another configuration (hash {stored}, this "
                        f"run {self.config_hash}); use another --out, or --force to discard them. "
                        f"Stored config: {self.get_meta('config')}")
                self.clear()
            self.set_meta("config_hash", self.config_hash)
            self.set_meta("config", config)

    def _tx(self):
        return _Transaction(self.conn)

    def _upgrade_from_v1(self) -> None:
        """Add the payload and digest columns; rows written by version 1 get their digest now."""
        with self._tx():
            cols = {r[1] for r in self.conn.execute("PRAGMA table_info(cells)")}
            if "payload" not in cols:
                self.conn.execute("ALTER TABLE cells ADD COLUMN payload TEXT NOT NULL DEFAULT '{}'")
            if "digest" not in cols:
                self.conn.execute("ALTER TABLE cells ADD COLUMN digest TEXT")
            for row in self.conn.execute(f"SELECT {_CELL_COLUMNS} FROM cells").fetchall():
                self.conn.execute("UPDATE cells SET digest = ? WHERE cell_id = ?",
                                  (_row_digest(row, self._trace_rows(row[0])), row[0]))
            self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)",
                              (json.dumps(SCHEMA_VERSION),))

    def _trace_rows(self, cell_id: str) -> list[tuple]:
        return self.conn.execute(f"SELECT {_TRACE_COLUMNS} FROM traces WHERE cell_id = ? "
                                 "ORDER BY iteration", (cell_id,)).fetchall()

    def close(self) -> None:
        self.conn.close()

    def clear(self) -> None:
        """Delete every cell and trace (``--force``); the meta entries stay."""
        with self._tx():
            self.conn.execute("DELETE FROM cells")
            self.conn.execute("DELETE FROM traces")

    # -- meta -------------------------------------------------------------------------------
    def set_meta(self, key: str, value: Any) -> None:
        with self._tx():
            self.conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                              (key, json.dumps(value, default=str)))

    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    # -- cells ------------------------------------------------------------------------------
    def has_cell(self, cell_id: str) -> bool:
        return self.conn.execute("SELECT 1 FROM cells WHERE cell_id = ?",
                                 (cell_id,)).fetchone() is not None

    def add_cell(self, cell_id: str, *, kind: str, method: str, seed: int, members: Optional[int],
                 metrics: dict, hparams: dict, seconds: float,
                 trace: Iterable[dict] = (), payload: Optional[dict] = None) -> None:
        """Write a finished cell, its trace and its payload atomically (all or nothing)."""
        rows = [(cell_id, int(t["iteration"]), t.get("epoch"), t.get("variance"),
                 t.get("mutual_info"), t.get("disagreement")) for t in trace]
        row = (cell_id, kind, method, int(seed), members, self.config_hash or "",
               json.dumps(metrics), json.dumps(hparams, default=str), float(seconds),
               json.dumps(payload or {}, default=str))
        with self._tx():
            self.conn.execute("DELETE FROM traces WHERE cell_id = ?", (cell_id,))
            self.conn.executemany("INSERT OR REPLACE INTO traces VALUES (?, ?, ?, ?, ?, ?)", rows)
            # the digest covers the values as SQLite returns them (REAL round-trips exactly)
            digest = _row_digest(row, self._trace_rows(cell_id))
            self.conn.execute(
                f"INSERT OR REPLACE INTO cells ({_CELL_COLUMNS}, finished_at, digest) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", (*row, time.time(), digest))

    def _verified(self, row: Sequence[Any], digest: Optional[str]) -> None:
        if digest != _row_digest(row, self._trace_rows(row[0])):
            raise StoreCorruptError(
                f"{self.path}: the row of cell {row[0]!r} was changed after it was written (its "
                "content does not match its digest); its numbers are not shown. Delete that row "
                "(the cell then reruns) or rerun with --force")

    def cells(self, kind: Optional[str] = None) -> list[dict]:
        """Finished cells (oldest first), each verified against its digest."""
        q = f"SELECT {_CELL_COLUMNS}, digest FROM cells"
        args: tuple = ()
        if kind is not None:
            q += " WHERE kind = ?"
            args = (kind,)
        out = []
        for row in self.conn.execute(q + " ORDER BY finished_at", args).fetchall():
            *row, digest = row
            self._verified(row, digest)
            cid, knd, method, seed, members, _, metrics, hparams, secs, payload = row
            out.append({"cell_id": cid, "kind": knd, "method": method, "seed": seed,
                        "members": members, "metrics": json.loads(metrics),
                        "hparams": json.loads(hparams), "seconds": secs,
                        "payload": json.loads(payload)})
        return out

    def trace(self, cell_id: str) -> list[dict]:
        rows = self.conn.execute(
            "SELECT iteration, epoch, variance, mutual_info, disagreement FROM traces "
            "WHERE cell_id = ? ORDER BY iteration", (cell_id,)).fetchall()
        return [dict(zip(("iteration", "epoch", "variance", "mutual_info", "disagreement"), r))
                for r in rows]


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (or ROLLBACK on error) on an autocommit connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self):
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb):
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")
        return False
