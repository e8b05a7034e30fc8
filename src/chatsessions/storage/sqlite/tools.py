"""Work on a data directory from outside the server: online backup and integrity check.

Both open the database read-only and take no lock, so they run beside a live
server (WAL lets them read a consistent snapshot while it writes).
"""

from __future__ import annotations

from pathlib import Path

import apsw

from chatsessions.errors import StorageCorrupted, StorageUnavailable
from chatsessions.storage.sqlite.schema import DB_NAME

_PAGES_A_STEP = 1024  # the source is locked only while a step copies; the server writes between steps


def _open_readonly(data_dir: Path) -> apsw.Connection:
    path = data_dir / DB_NAME
    if not path.is_file():
        raise StorageUnavailable(f"{path} does not exist: no sqlite store in {data_dir}")
    try:
        conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
        conn.set_busy_timeout(10_000)
        conn.execute("SELECT count(*) FROM sqlite_schema").fetchall()
    except (apsw.CorruptError, apsw.NotADBError) as exc:
        raise StorageCorrupted(f"{path} is not a chatsessions database or is corrupt ({exc})") from exc
    except apsw.Error as exc:
        raise StorageUnavailable(f"cannot read {path}: {exc}") from exc
    return conn


def integrity_check(data_dir: Path) -> list[str]:
    """Run `PRAGMA integrity_check` (it reads the whole file); return the problems, none when healthy."""
    conn = _open_readonly(data_dir)
    try:
        found = [str(row[0]) for row in conn.execute("PRAGMA integrity_check")]
    except (apsw.CorruptError, apsw.NotADBError) as exc:
        return [f"{data_dir / DB_NAME}: {exc}"]
    finally:
        conn.close()
    return [] if found == ["ok"] else found


def backup(data_dir: Path, destination: Path) -> Path:
    """Copy the live database into `destination` (a new or empty directory) with SQLite's online backup.

    The copy is a consistent snapshot and a data directory of its own: point
    CHATSESSIONS_DATA_DIR at it to serve it. Returns the database file written.
    """
    target = destination / DB_NAME
    if target.exists():
        raise StorageUnavailable(f"{target} exists already; back up into a new or empty directory")
    source = _open_readonly(data_dir)
    try:
        destination.mkdir(parents=True, exist_ok=True)
        copy = apsw.Connection(str(target))
        try:
            with copy.backup("main", source, "main") as job:
                while not job.done:
                    job.step(_PAGES_A_STEP)
            problems = [str(row[0]) for row in copy.execute("PRAGMA quick_check")]
        finally:
            copy.close()
    finally:
        source.close()
    if problems != ["ok"]:
        raise StorageCorrupted(f"the backup in {target} fails its check: {'; '.join(problems)}")
    return target
