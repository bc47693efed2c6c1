"""The durable job queue: one SQLite file (WAL) holding jobs, their inputs and their states; results on disk.

A job row and its input images are written in one transaction, so a rejected or half-received request leaves
nothing behind. Result PNGs are written atomically (``images.save_image``: temporary file, fsync, rename) before
the row is marked ``done``. After a crash (even ``kill -9``) :meth:`JobStore.recover` puts every ``running`` job
back in the queue: it is re-run from scratch with the seed stored at submission, so it gives the same image.
:meth:`JobStore.lock` keeps a second server off the same folder.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
import uuid
from pathlib import Path

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
STATES = (QUEUED, RUNNING, DONE, FAILED, CANCELLED)
FINISHED = (DONE, FAILED, CANCELLED)
MAX_ATTEMPTS = 3  # runs of a job cut short by a crash before recovery gives up on it

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    task TEXT NOT NULL,
    model TEXT,
    fields TEXT NOT NULL,              -- the request's fields as JSON (images are in the inputs table)
    batch_key TEXT,                    -- jobs with the same key may share one sampler run; NULL: run alone
    state TEXT NOT NULL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER,
    num_images INTEGER NOT NULL,
    settings TEXT,                     -- the resolved settings of the run (JSON), once it ran
    error TEXT,
    batch_size INTEGER,
    worker TEXT,
    created REAL NOT NULL,
    started REAL,
    finished REAL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, seq);
CREATE TABLE IF NOT EXISTS inputs (
    job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (job_id, name)
);
"""


class QueueFull(Exception):
    """The queue holds ``max_queue`` unfinished jobs already."""


class JobStore:
    """Jobs in ``<root>/jobs.sqlite3``, result images in ``<root>/results/<id>/<k>.png``. Thread-safe: one
    connection per thread; writes that must be atomic take SQLite's write lock (``BEGIN IMMEDIATE``)."""

    def __init__(self, root: str | Path, max_queue: int = 64, retention: int = 1000):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.results = self.root / "results"
        self.results.mkdir(exist_ok=True)
        self.path = self.root / "jobs.sqlite3"
        self.max_queue, self.retention = max_queue, retention
        self._local = threading.local()
        self.changed = threading.Condition()  # notified whenever a job is queued or finishes
        self._db().executescript(SCHEMA)  # idempotent; executescript commits on its own

    # -- connections -------------------------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db = db
        return db

    class _Tx:
        def __init__(self, db):
            self.db = db

        def __enter__(self):
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, exc_type, exc, tb):
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")

    def _tx(self):
        return self._Tx(self._db())

    def close(self):
        """Close this thread's connection and release the folder lock."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
        handle = getattr(self, "_lock_handle", None)
        if handle is not None:
            handle.close()
            self._lock_handle = None

    def _notify(self):
        with self.changed:
            self.changed.notify_all()

    # -- submit / read -----------------------------------------------------------------------------------------

    def submit(
        self,
        task: str,
        model: str | None,
        fields: dict,
        inputs: dict[str, bytes],
        num_images: int,
        batch_key: str | None = None,
    ) -> str:
        """Queue a job (its row and input images in one transaction); :class:`QueueFull` when the queue is full."""
        job_id = uuid.uuid4().hex
        with self._tx() as db:
            (pending,) = db.execute("SELECT COUNT(*) FROM jobs WHERE state IN (?, ?)", (QUEUED, RUNNING)).fetchone()
            if pending >= self.max_queue:
                raise QueueFull(pending)
            db.execute(
                "INSERT INTO jobs (id, task, model, fields, batch_key, state, num_images, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, task, model, json.dumps(fields), batch_key, QUEUED, num_images, time.time()),
            )
            db.executemany(
                "INSERT INTO inputs (job_id, name, data) VALUES (?, ?, ?)",
                [(job_id, name, sqlite3.Binary(data)) for name, data in inputs.items()],
            )
        self._notify()
        return job_id

    def get(self, job_id: str) -> dict | None:
        row = self._db().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _row(row)

    def inputs(self, job_id: str) -> dict[str, bytes]:
        rows = self._db().execute("SELECT name, data FROM inputs WHERE job_id = ?", (job_id,)).fetchall()
        return {r["name"]: bytes(r["data"]) for r in rows}

    def counts(self) -> dict[str, int]:
        rows = self._db().execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall()
        return {s: 0 for s in STATES} | {r["state"]: r["n"] for r in rows}

    def queue_depth(self) -> int:
        c = self.counts()
        return c[QUEUED] + c[RUNNING]

    def ahead_of(self, job_id: str) -> int:
        row = (
            self._db()
            .execute(
                "SELECT COUNT(*) FROM jobs WHERE state = ? AND seq < (SELECT seq FROM jobs WHERE id = ?)",
                (QUEUED, job_id),
            )
            .fetchone()
        )
        return row[0]

    def result_path(self, job_id: str, k: int) -> Path:
        return self.results / job_id / f"{k}.png"

    # -- worker side -------------------------------------------------------------------------------------------

    def claim(self, worker: str, max_images: int = 1, models: set[str] | None = None) -> list[dict]:
        """Take the oldest queued job and, when it has a batch key, the next queued jobs with the same key
        (up to ``max_images`` images in all); mark them running. ``models``: only jobs for these models."""
        with self._tx() as db:
            rows = db.execute("SELECT * FROM jobs WHERE state = ? ORDER BY seq", (QUEUED,)).fetchall()
            rows = [r for r in rows if models is None or r["model"] is None or r["model"] in models]
            if not rows:
                return []
            first = rows[0]
            taken = [first]
            if first["batch_key"] is not None:
                total = first["num_images"]
                for r in rows[1:]:
                    if r["batch_key"] == first["batch_key"] and total + r["num_images"] <= max_images:
                        taken.append(r)
                        total += r["num_images"]
            now = time.time()
            db.executemany(
                "UPDATE jobs SET state = ?, started = ?, worker = ?, attempts = attempts + 1, step = 0, "
                "batch_size = ? WHERE id = ?",
                [(RUNNING, now, worker, len(taken), r["id"]) for r in taken],
            )
        return [_row(r) | {"state": RUNNING, "started": now} for r in taken]

    def progress(self, job_ids: list[str], step: int, total: int | None):
        with self._tx() as db:
            db.executemany(
                "UPDATE jobs SET step = ?, total_steps = ? WHERE id = ? AND state = ?",
                [(step, total, j, RUNNING) for j in job_ids],
            )

    def finish(self, job_id: str, state: str, settings: dict | None = None, error: str | None = None):
        """Move a running job to a final state (``done`` only after its images are on disk); its inputs go."""
        assert state in FINISHED, state
        with self._tx() as db:
            n = db.execute(
                "UPDATE jobs SET state = ?, finished = ?, settings = COALESCE(?, settings), error = ? "
                "WHERE id = ? AND state = ?",
                (state, time.time(), None if settings is None else json.dumps(settings), error, job_id, RUNNING),
            ).rowcount
            if n:
                db.execute("DELETE FROM inputs WHERE job_id = ?", (job_id,))
        self._notify()
        self.prune()

    def requeue(self, job_ids: list[str]):
        """Put running jobs back (a batch stopped because one of its jobs was cancelled, or a shutdown)."""
        with self._tx() as db:
            db.executemany(
                "UPDATE jobs SET state = ?, step = 0, started = NULL, worker = NULL WHERE id = ? AND state = ?",
                [(QUEUED, j, RUNNING) for j in job_ids],
            )
        for j in job_ids:
            shutil.rmtree(self.results / j, ignore_errors=True)
        self._notify()

    def cancel_requested(self, job_id: str) -> bool:
        row = self._db().execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row[0])

    # -- client side -------------------------------------------------------------------------------------------

    def cancel(self, job_id: str) -> str | None:
        """Cancel a queued job at once, flag a running one (its worker stops at the next step). Returns the state
        the job is in afterwards (``None``: no such job)."""
        with self._tx() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            if row["state"] == QUEUED:
                db.execute(
                    "UPDATE jobs SET state = ?, finished = ?, cancel_requested = 1 WHERE id = ?",
                    (CANCELLED, time.time(), job_id),
                )
                db.execute("DELETE FROM inputs WHERE job_id = ?", (job_id,))
                state = CANCELLED
            elif row["state"] == RUNNING:
                db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
                state = RUNNING
            else:
                state = row["state"]
        self._notify()
        return state

    def delete(self, job_id: str) -> bool:
        """Remove a finished job and its images."""
        with self._tx() as db:
            n = db.execute("DELETE FROM jobs WHERE id = ? AND state IN (?, ?, ?)", (job_id, *FINISHED)).rowcount
        if n:  # never the folder of a job that is still running
            shutil.rmtree(self.results / job_id, ignore_errors=True)
        return bool(n)

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def lock(self):
        """Hold an exclusive lock on the data folder for this object's life: a second server on the same folder
        would :meth:`recover` (re-run) the first one's running jobs. ``RuntimeError`` if another process holds it."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: one server per folder is up to the operator
            return
        handle = open(self.root / "lock", "a")  # noqa: SIM115 - held open until close()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise RuntimeError(f"{self.root} is in use by another kandinsky3 server (one per data dir)") from None
        self._lock_handle = handle

    def recover(self) -> int:
        """At start: jobs left ``running`` by a crash go back to the queue (their partial results are removed).
        Instead, one whose cancellation was requested is cancelled, and one that was running at ``MAX_ATTEMPTS``
        crashes fails (a job that kills the process must not crash-loop the server). Returns how many were
        requeued."""
        with self._tx() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM jobs WHERE state = ?", (RUNNING,))]
            now = time.time()
            db.execute(
                "UPDATE jobs SET state = ?, finished = ? WHERE state = ? AND cancel_requested = 1",
                (CANCELLED, now, RUNNING),
            )
            db.execute(
                "UPDATE jobs SET state = ?, finished = ?, error = ? WHERE state = ? AND attempts >= ?",
                (FAILED, now, f"the server stopped during each of its {MAX_ATTEMPTS} runs", RUNNING, MAX_ATTEMPTS),
            )
            requeued = db.execute(
                "UPDATE jobs SET state = ?, step = 0, started = NULL, worker = NULL WHERE state = ?",
                (QUEUED, RUNNING),
            ).rowcount
            db.executemany(
                "DELETE FROM inputs WHERE job_id = ? AND (SELECT state FROM jobs WHERE id = ?) != ?",
                [(j, j, QUEUED) for j in ids],
            )
        for j in ids:
            shutil.rmtree(self.results / j, ignore_errors=True)
        # folders of jobs deleted by a delete or prune cut short between its commit and its rmtree
        known = {r[0] for r in self._db().execute("SELECT id FROM jobs")}
        for folder in self.results.iterdir():
            if folder.name not in known:
                shutil.rmtree(folder, ignore_errors=True)
        # temporary files of interrupted atomic writes
        for tmp in self.results.glob("*/.*.part"):
            tmp.unlink(missing_ok=True)
        return requeued

    def prune(self):
        """Keep the newest ``retention`` finished jobs; older ones go, with their images."""
        if self.retention is None:
            return
        with self._tx() as db:
            ids = [
                r[0]
                for r in db.execute(
                    "SELECT id FROM jobs WHERE state IN (?, ?, ?) ORDER BY seq DESC LIMIT -1 OFFSET ?",
                    (*FINISHED, self.retention),
                )
            ]
            db.executemany("DELETE FROM jobs WHERE id = ?", [(j,) for j in ids])
        for j in ids:
            shutil.rmtree(self.results / j, ignore_errors=True)

    def integrity_check(self) -> str:
        return self._db().execute("PRAGMA integrity_check").fetchone()[0]


def _row(row: sqlite3.Row) -> dict:
    d = dict(row)
    d["fields"] = json.loads(d["fields"])
    d["settings"] = None if d["settings"] is None else json.loads(d["settings"])
    return d
