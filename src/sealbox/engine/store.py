"""The state store: one SQLite file per installation (WAL, so CLI runs and a server share it).

Secret values are never written here; only names, hosts and placeholders' existence.
"""

from __future__ import annotations

import builtins

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from sealbox.engine.spec import SandboxInfo, SandboxState

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    owner TEXT,
    state TEXT NOT NULL,
    info TEXT NOT NULL,
    host_pid INTEGER NOT NULL,
    host_pid_start TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sandboxes_state ON sandboxes(state);
CREATE TABLE IF NOT EXISTS pools (
    key TEXT PRIMARY KEY,
    config TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    key_hash TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    admin INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL
);
"""
LIVE_STATES = (SandboxState.creating.value, SandboxState.running.value, SandboxState.paused.value)


def process_start_time(pid: int) -> str:
    """Identifies a process across pid reuse: field 22 of /proc/PID/stat ('' if gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def now() -> datetime:
    return datetime.now(UTC)


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        os.chmod(path, 0o600)
        self._me = (os.getpid(), process_start_time(os.getpid()))

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def put(self, info: SandboxInfo) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO sandboxes(id, owner, state, info, host_pid, host_pid_start, created_at)"
                " VALUES (?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET state=excluded.state,"
                # owner too: a warm-pool member gets its owner when it is claimed
                " info=excluded.info, owner=excluded.owner",
                (info.id, info.owner, info.state.value, info.model_dump_json(), self._me[0],
                 self._me[1], info.created_at.isoformat()),
            )

    def get(self, sandbox_id: str) -> SandboxInfo | None:
        with self._lock:
            row = self._db.execute("SELECT info FROM sandboxes WHERE id=?", (sandbox_id,)).fetchone()
        return SandboxInfo.model_validate_json(row[0]) if row else None

    def list(self, owner: str | None = None, live_only: bool = True) -> builtins.list[SandboxInfo]:
        sql, args = "SELECT info FROM sandboxes WHERE 1=1", []
        if owner is not None:
            sql += " AND owner=?"
            args.append(owner)
        if live_only:
            sql += f" AND state IN ({','.join('?' * len(LIVE_STATES))})"
            args.extend(LIVE_STATES)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY created_at", args).fetchall()
        return [SandboxInfo.model_validate_json(r[0]) for r in rows]

    def orphans(self) -> builtins.list[SandboxInfo]:
        """Live sandboxes whose owning process is gone (a server or CLI that died)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT info, host_pid, host_pid_start FROM sandboxes WHERE state IN "
                f"({','.join('?' * len(LIVE_STATES))})", LIVE_STATES,
            ).fetchall()
        return [
            SandboxInfo.model_validate_json(info)
            for info, pid, start in rows
            if process_start_time(pid) != start
        ]

    def adopt(self, sandbox_id: str) -> None:
        """Make this process the sandbox's owner (resuming a paused sandbox whose owner died)."""
        with self._tx() as db:
            db.execute("UPDATE sandboxes SET host_pid=?, host_pid_start=? WHERE id=?",
                       (self._me[0], self._me[1], sandbox_id))

    def disown(self, sandbox_id: str) -> None:
        """Leave the sandbox to whichever process comes next (a paused sandbox kept across an
        engine shutdown): it counts as an orphan from now on."""
        with self._tx() as db:
            db.execute("UPDATE sandboxes SET host_pid=-1, host_pid_start='none' WHERE id=?",
                       (sandbox_id,))

    def prune(self, keep: int = 1000) -> None:
        """Forget the oldest ended sandboxes beyond KEEP."""
        with self._tx() as db:
            db.execute(
                f"DELETE FROM sandboxes WHERE state NOT IN ({','.join('?' * len(LIVE_STATES))})"
                " AND id NOT IN (SELECT id FROM sandboxes ORDER BY created_at DESC LIMIT ?)",
                (*LIVE_STATES, keep),
            )

    # API keys are stored hashed; the server owns their meaning.
    def add_key(self, key_hash: str, tenant: str, admin: bool) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO api_keys(key_hash, tenant, admin, created_at) VALUES (?,?,?,?)",
                (key_hash, tenant, int(admin), now().isoformat()),
            )

    def find_key(self, key_hash: str) -> tuple[str, bool] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT tenant, admin FROM api_keys WHERE key_hash=?", (key_hash,)
            ).fetchone()
        return (row[0], bool(row[1])) if row else None

    # Warm pool configurations (JSON; engine/pools.py owns their meaning).
    def put_pool(self, key: str, config_json: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO pools(key, config) VALUES (?,?)", (key, config_json))

    def delete_pool(self, key: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM pools WHERE key=?", (key,))

    def list_pools(self) -> builtins.list[str]:
        with self._lock:
            rows = self._db.execute("SELECT config FROM pools ORDER BY key").fetchall()
        return [r[0] for r in rows]

    def close(self) -> None:
        self._db.close()
