"""One writer per run folder: a lease file created atomically, kept alive by a heartbeat.

`.lease` in the run folder is created with O_CREAT|O_EXCL (atomic locally and on NFSv3+; no
flock), names its holder (host, pid, SLURM job), and its mtime is the heartbeat. A gone holder's
lease (dead pid on this host, SLURM job no longer queued or running, stale heartbeat) is taken
over by the one taker that O_EXCL-creates the claim file for that exact lease text.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType

from ncsweep.diskspace import guard_write
from ncsweep.errors import ConfigError
from ncsweep.liveness import (
    boot_id,
    job_over,
    job_state,
    job_states,
    pid_gone,
    process_start,
    slurm_job,
)

log = logging.getLogger(__name__)

LEASE_FILE = ".lease"
CLAIM_PREFIX = ".lease.takeover."
HEARTBEAT_S = 5.0
STALE_AFTER_S = 60.0
WAIT_S = 10.0
CREATING_GRACE_S = 5.0
CLAIM_STALE_S = 30.0


class RunHeld(RuntimeError):
    """The run folder's lease is held by a live holder; the message is one line naming it."""

    def __init__(self, folder: Path, holder: Holder) -> None:
        super().__init__(f"run folder {folder} is already {holder.describe()}")
        self.folder, self.holder = folder, holder

    def __reduce__(self) -> tuple:
        """Pickle by the constructor's arguments, so the error crosses process boundaries."""
        return type(self), (self.folder, self.holder)


class LeaseError(RuntimeError):
    """The lease could not be settled within the bounded wait; the message is one line."""


@dataclass(frozen=True)
class Holder:
    """Who holds a run folder: the process, its SLURM job, and when it started and last beat."""

    host: str
    pid: int | None
    job: str | None
    node: str
    started: float
    token: str
    restarts: int = 0
    boot: str | None = None
    proc_start: str | None = None
    heartbeat: float = field(default=0.0, compare=False)

    @property
    def reserved(self) -> bool:
        """True for a placeholder written at submission for a job that has not started yet."""
        return self.pid is None

    def describe(self) -> str:
        """One phrase: 'running in job 15_0 on node vm since 05:30' or by pid and host."""
        since = _clock(self.started)
        if self.reserved:
            return f"queued in job {self.job} since {since}"
        if self.job:
            return f"running in job {self.job} on node {self.node} since {since}"
        return f"running as pid {self.pid} on host {self.host} since {since}"


_FIELDS = tuple(name for name in Holder.__dataclass_fields__ if name != "heartbeat")


def _clock(stamp: float) -> str:
    """A time of day, with the date when it is not today."""
    when = time.localtime(stamp)
    same_day = time.strftime("%Y%m%d", when) == time.strftime("%Y%m%d")
    return time.strftime("%H:%M" if same_day else "%b %d %H:%M", when)


def _me(pid: int | None) -> Holder:
    """A Holder record for this process (pid None: a reservation for a queued job)."""
    job, restarts = slurm_job()
    host = socket.gethostname()
    return Holder(host=host, pid=pid, job=job, node=os.environ.get("SLURMD_NODENAME", host),
                  started=time.time(), token=uuid.uuid4().hex, restarts=restarts,
                  boot=boot_id(), proc_start=None if pid is None else process_start(pid))


def _encode(holder: Holder) -> str:
    """The lease file's content: one JSON object (the heartbeat lives in the mtime)."""
    record = asdict(holder)
    record.pop("heartbeat")
    return json.dumps(record, sort_keys=True) + "\n"


def _decode(raw: str, mtime: float) -> Holder | None:
    """The Holder in a lease file's text, or None when it is not a complete lease."""
    try:
        record = json.loads(raw)
        known = {name: record[name] for name in _FIELDS if name in record}
        return Holder(**known, heartbeat=mtime)
    except (ValueError, TypeError):
        return None


def _snapshot(path: Path) -> tuple[str, float] | None:
    """(text, mtime) of the lease file, or None when there is none."""
    try:
        with open(path) as handle:
            return handle.read(), os.fstat(handle.fileno()).st_mtime
    except FileNotFoundError:
        return None


def _gone_reason(holder: Holder, me: Holder, stale_after_s: float,
                 state_of: Callable[[str], str | None] = job_state) -> str | None:
    """Why the holder is gone, or None while it may still be writing."""
    if holder.job and holder.job == me.job and holder.reserved:
        return "it was this job's reservation"
    if holder.job and holder.job == me.job and holder.restarts < me.restarts:
        return f"it was attempt {holder.restarts} of this job, now attempt {me.restarts}"
    if holder.pid is not None and holder.host == me.host:
        if holder.boot and me.boot and holder.boot != me.boot:
            return f"host {holder.host} has rebooted since"
        if holder.pid == os.getpid():
            return "it was this process's own earlier lease"
        gone = pid_gone(holder.pid, holder.proc_start)
        return f"pid {holder.pid} on host {holder.host} {gone}" if gone else None
    state = state_of(holder.job) if holder.job else None
    if state is not None:
        over = job_over(state)
        return f"job {holder.job} is no longer queued or running ({state})" if over else None
    age = time.time() - holder.heartbeat
    if age > stale_after_s:
        return f"its heartbeat is {age:.0f} s old (stale after {stale_after_s:g} s)"
    return None


def _create(path: Path, content: str, durable: bool = True) -> bool:
    """Create the lease file with its content if there is none; False when one exists.
    ``durable``: on disk before this returns (fsync)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, content.encode())
        if durable:
            os.fsync(fd)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    return True


def _take_over(path: Path, old: str, content: str) -> bool:
    """Replace exactly the lease text `old` with `content`; False when another taker won."""
    digest = hashlib.sha1(old.encode()).hexdigest()[:16]
    claims = [path.with_name(f"{CLAIM_PREFIX}{digest}.{n}") for n in range(3)]
    for claim in claims:
        try:
            os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - claim.stat().st_mtime < CLAIM_STALE_S:
                    return False
            continue
        try:
            current = _snapshot(path)
            if current is None or current[0] != old:
                return False
            tmp = path.with_name(f"{LEASE_FILE}.{os.getpid()}.{digest}.tmp")
            try:
                with open(tmp, "w") as handle:
                    handle.write(content)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            for other in claims:
                other.unlink(missing_ok=True)
            return True
        finally:
            claim.unlink(missing_ok=True)
    return False


_HELD: dict[Path, Lease] = {}
_HELD_LOCK = threading.Lock()


class Lease:
    """A held lease on one run folder; release it (or leave the `with` block) when done."""

    def __init__(self, folder: Path, holder: Holder, heartbeat_s: float) -> None:
        self.folder, self.path, self.holder = folder, folder / LEASE_FILE, holder
        self.heartbeat_s, self.lost, self._count = heartbeat_s, False, 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease {folder}", daemon=True)

    @classmethod
    def acquire(cls, folder: Path | str, heartbeat_s: float = HEARTBEAT_S,
                stale_after_s: float = STALE_AFTER_S, wait_s: float = WAIT_S) -> Lease:
        """Hold the folder's lease (taking over a gone holder's); RunHeld when a live one has it."""
        _check_timing(heartbeat_s, stale_after_s)
        folder = Path(folder).resolve()
        with _HELD_LOCK:
            held = _HELD.get(folder)
            if held is not None and held.holder.pid == os.getpid() and not held.lost:
                held._count += 1
                return held
            holder = _settle(folder, _me(os.getpid()), stale_after_s, wait_s)
            lease = cls(folder, holder, heartbeat_s)
            _HELD[folder] = lease
        lease._thread.start()
        return lease

    def release(self) -> None:
        """Let go: stop the heartbeat and remove the lease file if it is still this one."""
        with _HELD_LOCK:
            self._count -= 1
            if self._count != 0:
                return
            if _HELD.get(self.folder) is self:
                del _HELD[self.folder]
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(1.0, 2 * self.heartbeat_s))
        current = _snapshot(self.path)
        if current is not None and current[0] == _encode(self.holder):
            self.path.unlink(missing_ok=True)
        elif not self.lost:
            log.warning("lease of %s was no longer this process's at release; left as is",
                        self.folder)

    def __enter__(self) -> Lease:
        """The held lease itself."""
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        """Release on leaving the block, however it is left."""
        self.release()

    def _beat(self) -> None:
        """Refresh the mtime every heartbeat_s while the lease is still this process's."""
        mine = _encode(self.holder)
        while not self._stop.wait(self.heartbeat_s):
            try:
                current = _snapshot(self.path)
                if current is None or current[0] != mine:
                    log.error("lost the lease of %s: the lease file was removed or replaced",
                              self.folder)
                    self.lost = True  # after the line: whoever sees the flag can read why
                    return
                os.utime(self.path)
            except OSError as error:
                log.warning("could not refresh the lease of %s: %s", self.folder, error)


def _check_timing(heartbeat_s: float, stale_after_s: float) -> None:
    """Refuse a heartbeat that a reader could mistake for a dead holder."""
    if not heartbeat_s > 0:
        raise ConfigError("lease.heartbeat_s", heartbeat_s, "a positive number of seconds")
    if not stale_after_s >= 3 * heartbeat_s:
        raise ConfigError("lease.stale_after_s", stale_after_s,
                          f"at least 3 x lease.heartbeat_s ({3 * heartbeat_s:g} s)")


def _settle(folder: Path, me: Holder, stale_after_s: float, wait_s: float,
            durable: bool = True) -> Holder:
    """Write `me` as the folder's lease, fresh or over a gone holder; RunHeld when live."""
    path = folder / LEASE_FILE
    with guard_write("the run's lease", path):
        folder.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + wait_s
        while not _settled(folder, me, stale_after_s, durable):
            if time.monotonic() > deadline:
                raise LeaseError(f"could not settle the lease of {folder} within {wait_s:g} s; "
                                 f"another process keeps changing {path}")
            time.sleep(0.05)
    return me


def _settled(folder: Path, me: Holder, stale_after_s: float, durable: bool = True) -> bool:
    """One try at writing `me` as the lease; False when it is being created or taken meanwhile."""
    path, content = folder / LEASE_FILE, _encode(me)
    if _create(path, content, durable):
        return True
    current = _snapshot(path)
    if current is None:
        return False
    holder = _decode(*current)
    if holder is None:
        if time.time() - current[1] < CREATING_GRACE_S:
            return False
        reason = "the lease file is unreadable"
    else:
        reason = _gone_reason(holder, me, stale_after_s)
        if reason is None:
            raise RunHeld(folder, holder)
    if not _take_over(path, current[0], content):
        return False
    gone = holder.describe() if holder else "an unreadable lease"
    own = holder is not None and holder.reserved and holder.job == me.job
    log.log(logging.INFO if own else logging.WARNING, "taking over the lease of %s (%s): %s",
            folder, gone, reason)
    return True


def holder(folder: Path | str, stale_after_s: float = STALE_AFTER_S) -> Holder | None:
    """Who holds the folder now without taking it; None when nobody live does."""
    return holders([folder], stale_after_s).get(Path(folder))


def holders(folders: Iterable[Path | str],
            stale_after_s: float = STALE_AFTER_S) -> dict[Path, Holder]:
    """The live holders among many run folders, with one squeue call for all; free ones absent."""
    me, found = _me(os.getpid()), {}
    for folder in map(Path, folders):
        current = _snapshot(folder / LEASE_FILE)
        held = _decode(*current) if current else None
        if held is not None:
            found[folder] = held
    jobs = {h.job for h in found.values() if h.job and (h.pid is None or h.host != me.host)}
    states = (job_states(jobs) if jobs else None) or {}
    return {folder: held for folder, held in found.items()
            if (held.host, held.pid) == (me.host, me.pid)
            or _gone_reason(held, me, stale_after_s, states.get) is None}


def reserve(folder: Path | str, job: str, stale_after_s: float = STALE_AFTER_S,
            wait_s: float = WAIT_S) -> Holder:
    """Mark the folder as held by a submitted SLURM job until that job takes the lease itself.

    Not synced to disk one by one (10,000 fsyncs took seconds here, and take far longer on a
    network filesystem): a reservation lost to a crash of this machine before the kernel wrote
    it back leaves a missing or empty file, so a re-run may submit that run again; the run's
    own lease, synced when a job takes it, still lets only one of the two train it."""
    folder = Path(folder).resolve()
    placeholder = _me(None)
    placeholder = Holder(**{**asdict(placeholder), "job": job, "restarts": 0})
    return _settle(folder, placeholder, stale_after_s, wait_s, durable=False)


@atexit.register
def _release_all() -> None:
    """Remove this process's leases at a normal exit so nobody has to wait for a takeover."""
    for lease in list(_HELD.values()):
        if lease.holder.pid == os.getpid():
            lease._count = 1
            lease.release()
