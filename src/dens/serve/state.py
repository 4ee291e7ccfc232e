"""The node's durable state: the spool of received instances and an SQLite database that says which studies
are receiving, answered or failed, each instance's preds.csv row, and the outbox of SRs to send.

Layout of the state folder::

    serve.db                      this database (WAL, synchronous FULL)
    serve.lock                    held by the node that keeps the folder (one node per folder)
    spool/<study key>/<sop key>.dcm   each received instance, as sent
    preds.csv, preds.breast.csv, preds.exam.csv
    sr/<SR SOP Instance UID>.dcm  each density SR, as sent

A key is the first 32 hex digits of the sha256 of the UID: a file name never holds a character a sender
chose, so no UID (``../``, ``/``, a NUL) can name a file outside the spool.

Exactly once: an instance is acknowledged only after its file is renamed into place (written, fsync'd, and
its folder fsync'd) and its database row committed; an instance already known is acknowledged again and not
stored twice. A pulled study's instances enter together (:meth:`State.receive_study`). preds.csv is the truth
about which instances are scored (a row per spool file, appended and fsync'd before the database learns it;
:meth:`State.adopt_rows` reconciles the two after a crash). A study is answered in one transaction with its
outbox entries, and an outbox entry is unique per SR instance and destination, so no SR goes twice to a
destination that acknowledged it.

A write the database cannot make (a full disk, a folder made read-only) raises :class:`StateWriteError`, an
OSError: the transaction is rolled back whole, the caller refuses what it could not record (a C-STORE gets
0xA700) or tries again later, and the node goes on. A read-only folder is read as it is, or from a copy
(:class:`State` with ``read_only``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from dens import labels
from dens.files import fsync_dir

log = logging.getLogger(__name__)

DB_NAME, SPOOL, SR_DIR, PREDS, LOCK = "serve.db", "spool", "sr", "preds.csv", "serve.lock"
RECEIVING, ANSWERED, FAILED = "receiving", "answered", "failed"
PENDING, SENT = "pending", "sent"
# An instance's preds.csv status (ok, skipped, error; NULL until it is scored), as the status counts it.
ROW_STATUS = f"json_extract(row, '$.{labels.STATUS}')"

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS studies (
    study_key TEXT PRIMARY KEY, study_uid TEXT NOT NULL, state TEXT NOT NULL, generation INTEGER NOT NULL,
    first_received REAL NOT NULL, last_received REAL NOT NULL, answered REAL, sr_uid TEXT, density TEXT,
    error TEXT);
CREATE TABLE IF NOT EXISTS instances (
    sop_key TEXT PRIMARY KEY, study_key TEXT NOT NULL, sop_uid TEXT NOT NULL, path TEXT NOT NULL,
    calling_aet TEXT, address TEXT, received REAL NOT NULL, row TEXT);
CREATE INDEX IF NOT EXISTS instances_study ON instances (study_key);
CREATE INDEX IF NOT EXISTS instances_status ON instances ({ROW_STATUS});
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY, study_key TEXT NOT NULL, sr_uid TEXT NOT NULL, sr_path TEXT NOT NULL,
    destination TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_try REAL NOT NULL,
    last_error TEXT, created REAL NOT NULL, sent REAL, UNIQUE (sr_uid, destination));
CREATE INDEX IF NOT EXISTS outbox_study ON outbox (study_key);
CREATE TABLE IF NOT EXISTS refused (
    id INTEGER PRIMARY KEY, time REAL NOT NULL, calling_aet TEXT, address TEXT, sop_uid TEXT, reason TEXT);
CREATE TABLE IF NOT EXISTS errors (id INTEGER PRIMARY KEY, time REAL NOT NULL, study_uid TEXT, message TEXT);
"""


def key(kind: str, uid: str) -> str:
    """The file-name key of a UID: 32 hex digits of its sha256 (``kind`` keeps a study's and an instance's
    keys apart even for one UID)."""
    return hashlib.sha256(f"{kind}:{uid}".encode("utf-8", "surrogatepass")).hexdigest()[:32]


@dataclass(frozen=True)
class Instance:
    """A spooled instance: its keys, where its file is, and its preds.csv row once it is scored."""

    sop_key: str
    path: Path
    row: dict[str, str] | None


@dataclass(frozen=True)
class Send:
    """An outbox entry due for a (re)try."""

    id: int
    study_key: str
    sr_uid: str
    sr_path: Path
    destination: str
    attempts: int


class StateLocked(RuntimeError):
    """Another node keeps this state folder."""


class StateWriteError(OSError):
    """The state's database could not record a change (nothing of it was kept): the disk is full, or the folder
    cannot be written. ``strerror`` says which, short enough for a C-STORE's Error Comment."""

    @classmethod
    def of(cls, exc: sqlite3.Error) -> StateWriteError:
        text = str(exc).lower()
        if "full" in text:
            return cls(errno.ENOSPC, "no space left for the state database")
        if "readonly" in text or "read-only" in text:
            return cls(errno.EROFS, "the state database is read-only")
        return cls(errno.EIO, f"the state database cannot be written ({exc})")


def _open_read_only(db: Path) -> tuple[sqlite3.Connection, tempfile.TemporaryDirectory | None]:
    """A connection that reads ``db`` and writes nothing next to it, and the temporary folder it needs (None when
    it needs none). SQLite reads a WAL database in place when its shared-memory file can be used; in a folder
    that cannot be written, where that file is missing, the database and its WAL are read from a copy."""
    try:
        con = sqlite3.connect(f"{db.absolute().as_uri()}?mode=ro", uri=True, check_same_thread=False)
    except sqlite3.OperationalError as exc:
        why = exc
    else:
        try:
            con.execute("SELECT COUNT(*) FROM sqlite_master").fetchall()  # opens the file (and its WAL) now
            return con, None
        except sqlite3.OperationalError as exc:
            con.close()
            why = exc
    copy = tempfile.TemporaryDirectory(prefix="dens-serve-status-")
    try:
        for suffix in ("", "-wal"):
            if Path(f"{db}{suffix}").is_file():
                shutil.copyfile(f"{db}{suffix}", Path(copy.name) / f"{DB_NAME}{suffix}")
        con = sqlite3.connect(Path(copy.name) / DB_NAME, check_same_thread=False)
        con.execute("SELECT COUNT(*) FROM sqlite_master").fetchall()
    except (OSError, sqlite3.Error) as exc:
        copy.cleanup()
        raise OSError(f"cannot read {db} ({why}; from a copy: {exc})") from exc
    return con, copy


class State:
    """The state folder's database, shared by the node's threads (one connection, one lock). Opened for
    writing, it holds the folder's lock file until :meth:`close` (raises StateLocked when another process
    holds it)."""

    def __init__(self, folder: str | os.PathLike, *, read_only: bool = False):
        self.folder = Path(folder)
        self.spool = self.folder / SPOOL
        self.sr_dir = self.folder / SR_DIR
        self.preds = self.folder / PREDS
        db = self.folder / DB_NAME
        self._lock_file = None
        self._copy: tempfile.TemporaryDirectory | None = None
        if read_only:
            if not db.is_file():
                raise FileNotFoundError(f"{self.folder} holds no dens-serve state ({DB_NAME} not found)")
            self._db, self._copy = _open_read_only(db)
        else:
            for folder_ in (self.folder, self.spool, self.sr_dir):
                folder_.mkdir(parents=True, exist_ok=True)
            self._lock_file = open(self.folder / LOCK, "a")  # noqa: SIM115 (held until close())
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                self._lock_file.close()
                raise StateLocked(
                    f"another dens-serve keeps {self.folder}: stop it, or give this one its own folder"
                ) from exc
            self._db = sqlite3.connect(db, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()
        if self._lock_file is not None:
            self._lock_file.close()  # releases the lock
        if self._copy is not None:
            self._copy.cleanup()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write, whole or not at all; StateWriteError when the database cannot take it (the transaction
        is rolled back, so the connection stays usable for the next one)."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:  # SQLite may have rolled back a failed COMMIT itself
                        with contextlib.suppress(sqlite3.Error):
                            self._db.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as exc:  # full, read-only, I/O error: not a bug in a statement
                raise StateWriteError.of(exc) from exc

    def read(self, sql: str, args: Iterable = ()) -> list[tuple]:
        """The rows a query gives (a query that changes nothing: the status' and audits')."""
        with self._lock:
            return self._db.execute(sql, tuple(args)).fetchall()

    # --- receiving ------------------------------------------------------------------------------------------

    def spool_path(self, study_uid: str, sop_uid: str) -> Path:
        return self.spool / key("study", study_uid) / f"{key('sop', sop_uid)}.dcm"

    def knows(self, sop_uid: str) -> bool:
        return bool(self.read("SELECT 1 FROM instances WHERE sop_key = ?", [key("sop", sop_uid)]))

    def receive_file(self, study_uid: str, sop_uid: str, path: Path, calling_aet: str = "", address: str = "") -> bool:
        """Move a received file (durable, on the spool's filesystem) into the spool and record it, durable before
        the C-STORE is acknowledged; False when the instance was already there (``path`` is then left where it is).
        A record the database cannot take (a full disk) removes the file again: the sender sends it again."""
        if self.knows(sop_uid):
            return False
        target = self.spool_path(study_uid, sop_uid)
        if not target.parent.is_dir():
            target.parent.mkdir(exist_ok=True)
            fsync_dir(self.spool)
        os.replace(path, target)
        fsync_dir(target.parent)
        try:
            return self.register(study_uid, sop_uid, target, calling_aet, address)
        except OSError:
            target.unlink(missing_ok=True)
            raise

    def receive_study(
        self, study_uid: str, files: Mapping[str, Path], calling_aet: str = "", address: str = ""
    ) -> list[str]:
        """Move a study's files (by SOP Instance UID; durable, on the spool's filesystem) into the spool and record
        them in one transaction, so that the scheduler sees all of them or none. A study new to the spool has its
        folder put together beside it (hidden) and renamed into place whole, so that after a crash
        :func:`dens.serve.node.recover` finds all of them or none. Returns the SOP Instance UIDs recorded; the
        files of instances already held are left where they are."""
        new = {sop_uid: Path(path) for sop_uid, path in files.items() if not self.knows(sop_uid)}
        if not new:
            return []
        folder = self.spool / key("study", study_uid)
        if folder.is_dir():
            for sop_uid, path in new.items():
                os.replace(path, self.spool_path(study_uid, sop_uid))
        else:
            stage = self.spool / f".{folder.name}.stage"
            shutil.rmtree(stage, ignore_errors=True)  # what an attempt that failed left
            stage.mkdir()
            for sop_uid, path in new.items():
                os.replace(path, stage / self.spool_path(study_uid, sop_uid).name)
            fsync_dir(stage)
            try:
                os.replace(stage, folder)
            except OSError as exc:  # a C-STORE of the study made its folder meanwhile: the files go one by one
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                for path in stage.iterdir():
                    os.replace(path, folder / path.name)
                stage.rmdir()
            fsync_dir(self.spool)
        fsync_dir(folder)
        now = time.time()
        try:
            with self._transaction() as db:
                return [
                    sop_uid
                    for sop_uid in new
                    if self._record(
                        db, study_uid, sop_uid, self.spool_path(study_uid, sop_uid), calling_aet, address, now
                    )
                ]
        except OSError:  # nothing recorded: nothing kept (the next poll fetches them again)
            for sop_uid in new:
                if not self.knows(sop_uid):
                    self.spool_path(study_uid, sop_uid).unlink(missing_ok=True)
            raise

    def register(self, study_uid: str, sop_uid: str, path: Path, calling_aet: str = "", address: str = "") -> bool:
        """Record a spooled file: its study goes back to receiving (its quiet time starts again)."""
        with self._transaction() as db:
            return self._record(db, study_uid, sop_uid, path, calling_aet, address, time.time())

    @staticmethod
    def _record(
        db: sqlite3.Connection, study_uid: str, sop_uid: str, path: Path, calling_aet: str, address: str, now: float
    ) -> bool:
        study_key = key("study", study_uid)
        added = db.execute(
            "INSERT OR IGNORE INTO instances (sop_key, study_key, sop_uid, path, calling_aet, address, received) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (key("sop", sop_uid), study_key, sop_uid, str(path), calling_aet, address, now),
        ).rowcount
        if added:
            db.execute(
                "INSERT INTO studies (study_key, study_uid, state, generation, first_received, last_received) "
                "VALUES (?, ?, ?, 1, ?, ?) ON CONFLICT (study_key) DO UPDATE SET state = ?, "
                "generation = generation + 1, last_received = ?, error = NULL",
                (study_key, study_uid, RECEIVING, now, now, RECEIVING, now),
            )
        return bool(added)

    def refuse(self, calling_aet: str | None, address: str, reason: str, sop_uid: str | None = None) -> None:
        """Record a refused association, connection or instance; ``reason`` is ``code: detail``. A refusal the
        database cannot take (a full disk) is logged only: the refusal itself still goes back."""
        try:
            with self._transaction() as db:
                db.execute(
                    "INSERT INTO refused (time, calling_aet, address, sop_uid, reason) VALUES (?, ?, ?, ?, ?)",
                    (time.time(), calling_aet, address, sop_uid, reason),
                )
        except StateWriteError as exc:
            log.error("dens-serve: a refusal (%s) could not be recorded: %s", reason, exc.strerror)

    def answered(self, study_uids: Iterable[str]) -> set[str]:
        """Those of ``study_uids`` the node has answered (scored, their SR queued or sent)."""
        by_key = {key("study", uid): uid for uid in study_uids}
        keys, found = list(by_key), set()
        for i in range(0, len(keys), 500):  # SQLite's limit on a statement's variables
            chunk = keys[i : i + 500]
            found.update(
                k
                for (k,) in self.read(
                    f"SELECT study_key FROM studies WHERE state = ? AND study_key IN ({', '.join('?' * len(chunk))})",
                    [ANSWERED, *chunk],
                )
            )
        return {by_key[k] for k in found}

    def known_paths(self) -> set[str]:
        return {p for (p,) in self.read("SELECT path FROM instances")}

    # --- scoring --------------------------------------------------------------------------------------------

    def stable_studies(self, quiet_seconds: float, limit: int = 16) -> list[str]:
        """The studies quiet for ``quiet_seconds`` (their keys), those that have waited longest first."""
        found = self.read(
            "SELECT study_key FROM studies WHERE state = ? AND last_received <= ? ORDER BY last_received LIMIT ?",
            [RECEIVING, time.time() - quiet_seconds, limit],
        )
        return [k for (k,) in found]

    def snapshot(self, study_key: str) -> tuple[str, int, list[Instance]]:
        """A study's UID, generation (one more per instance received) and instances."""
        with self._lock:
            uid, generation = self._db.execute(
                "SELECT study_uid, generation FROM studies WHERE study_key = ?", (study_key,)
            ).fetchone()
            rows = self._db.execute(
                "SELECT sop_key, path, row FROM instances WHERE study_key = ? ORDER BY received, sop_key", (study_key,)
            ).fetchall()
        return uid, generation, [Instance(k, Path(p), json.loads(r) if r else None) for k, p, r in rows]

    def set_rows(self, rows: Mapping[str, Mapping[str, str]]) -> None:
        """Record the preds.csv rows (by sop key) just written."""
        with self._transaction() as db:
            db.executemany(
                "UPDATE instances SET row = ? WHERE sop_key = ?", [(json.dumps(r), k) for k, r in rows.items()]
            )

    def adopt_rows(self, rows: Mapping[str, Mapping[str, str]]) -> int:
        """After a crash: rows preds.csv holds that the database does not yet (by sop key); how many."""
        with self._transaction() as db:
            return sum(
                db.execute(
                    "UPDATE instances SET row = ? WHERE sop_key = ? AND row IS NULL", (json.dumps(r), k)
                ).rowcount
                for k, r in rows.items()
            )

    def answer(
        self, study_key: str, generation: int, sr_uid: str | None, sr_path: Path | None, density: str, destinations
    ) -> bool:
        """Mark a study answered and queue its SR for each destination, in one transaction; False (nothing
        changed) when an instance arrived since ``generation``: the study is scored again when quiet."""
        now = time.time()
        with self._transaction() as db:
            changed = db.execute(
                "UPDATE studies SET state = ?, answered = ?, sr_uid = ?, density = ?, error = NULL "
                "WHERE study_key = ? AND generation = ?",
                (ANSWERED, now, sr_uid, density, study_key, generation),
            ).rowcount
            if changed and sr_uid:
                db.executemany(
                    "INSERT OR IGNORE INTO outbox (study_key, sr_uid, sr_path, destination, state, next_try, created) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(study_key, sr_uid, str(sr_path), d, PENDING, now, now) for d in destinations],
                )
        return bool(changed)

    def fail(self, study_key: str, generation: int, message: str) -> None:
        """A study that could not be scored or reported: kept, with its error, until the next start."""
        with self._transaction() as db:
            db.execute(
                "UPDATE studies SET state = ?, error = ? WHERE study_key = ? AND generation = ?",
                (FAILED, message, study_key, generation),
            )
            db.execute(
                "INSERT INTO errors (time, study_uid, message) SELECT ?, study_uid, ? FROM studies WHERE study_key = ?",
                (time.time(), message, study_key),
            )

    def retry_failed(self) -> int:
        """At start: failed studies are scored again (the cause may be gone); how many."""
        with self._transaction() as db:
            return db.execute("UPDATE studies SET state = ? WHERE state = ?", (RECEIVING, FAILED)).rowcount

    # --- sending --------------------------------------------------------------------------------------------

    def due(self, limit: int = 16) -> list[Send]:
        found = self.read(
            "SELECT id, study_key, sr_uid, sr_path, destination, attempts FROM outbox "
            "WHERE state = ? AND next_try <= ? ORDER BY next_try LIMIT ?",
            [PENDING, time.time(), limit],
        )
        return [Send(i, s, u, Path(p), d, a) for i, s, u, p, d, a in found]

    def sent(self, send_id: int) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE outbox SET state = ?, sent = ?, attempts = attempts + 1, last_error = NULL WHERE id = ?",
                (SENT, time.time(), send_id),
            )

    def retry_later(self, send_id: int, error: str, delay: float) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ?, next_try = ? WHERE id = ?",
                (error, time.time() + delay, send_id),
            )

    def next_send_in(self) -> float | None:
        """Seconds until the next outbox entry is due (0 when one is due now); None when none is pending."""
        found = self.read("SELECT MIN(next_try) FROM outbox WHERE state = ?", [PENDING])[0][0]
        return None if found is None else max(0.0, found - time.time())

    # --- what the state holds -----------------------------------------------------------------------------

    def timeline(self) -> list[dict]:
        """Per answered study: its instance count, last instance received, answer, and each send (for
        benchmarks and audits)."""
        sends: dict[str, list[dict]] = {}
        for study_key, destination, state, attempts, created, sent in self.read(
            "SELECT study_key, destination, state, attempts, created, sent FROM outbox ORDER BY id"
        ):
            sends.setdefault(study_key, []).append(
                {"destination": destination, "state": state, "attempts": attempts, "queued": created, "sent": sent}
            )
        return [
            {
                "study_uid": uid,
                "instances": n,
                "last_received": last,
                "answered": answered,
                "density": density,
                "sr_uid": sr_uid,
                "sends": sends.get(study_key, []),
            }
            for study_key, uid, n, last, answered, density, sr_uid in self.read(
                "SELECT s.study_key, s.study_uid, (SELECT COUNT(*) FROM instances i WHERE i.study_key = s.study_key), "
                "s.last_received, s.answered, s.density, s.sr_uid FROM studies s WHERE s.state = ? "
                "ORDER BY s.answered",
                [ANSWERED],
            )
        ]
