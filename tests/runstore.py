"""Reading a run folder's result store in tests."""

import sqlite3


def finished_at(out) -> dict:
    """cell_id -> finished_at of every cell in ``out/results.sqlite`` (a resumed run that
    recomputes nothing leaves it unchanged)."""
    con = sqlite3.connect(out / "results.sqlite")
    try:
        return dict(con.execute("SELECT cell_id, finished_at FROM cells").fetchall())
    finally:
        con.close()
