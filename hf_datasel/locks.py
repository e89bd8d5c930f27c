"""Lock files that cannot wedge: each names its owner, a dead owner's lock is taken over, a live one waited for.

    with FileLock(folder / "merge.lock", timeout=600):
        ...  # one process at a time, across processes and machines that share the folder

The lock file is created with `O_EXCL` and holds its owner as JSON: host, pid, the process's
start time (so a reused pid is not mistaken for the owner) and a random token. While it is
held, a thread touches the file every `heartbeat` seconds.

A process that finds the lock taken decides whether its owner is gone:

* owner on this host: gone when its pid is not running, is a zombie, or started at another time;
* owner on another host (or a file whose owner cannot be read): gone when the file has not
  been touched for `stale_after` seconds, measured on this machine's clock (no clock skew).

A gone owner's lock is taken over with a warning (serialized with `flock` on the old file, so
two processes never take over the same lock). A live owner is waited for, with one message
when the wait starts and a `LockTimeout` naming the owner and the file after `timeout` seconds.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType

from .store import StoreError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: takeovers are not serialized
    fcntl = None

logger = logging.getLogger(__name__)


class LockTimeout(StoreError):
    """A lock held by a live process was not released within the timeout."""


def _boot_time() -> float | None:
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except OSError:
        pass
    return None


_BOOT_TIME = _boot_time()


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (None where /proc does not say)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def process_start_time(pid: int) -> float | None:
    """When process `pid` started, in seconds since the epoch (None where unknown)."""
    fields = _proc_stat(pid)
    if fields is None or _BOOT_TIME is None:
        return None
    return _BOOT_TIME + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def pid_running(pid: int, started: float | None = None) -> bool:
    """Whether `pid` is a running (not zombie) process on this host that started at `started` (±1 s)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    fields = _proc_stat(pid)
    if fields is not None and fields[0] in ("Z", "X"):
        return False
    if started is not None:
        now_started = process_start_time(pid)
        if now_started is not None and abs(now_started - started) > 1.0:
            return False  # the pid was reused by a later process
    return True


@dataclass(frozen=True)
class LockOwner:
    """Who holds a lock: host, pid, the process's start time, when the lock was taken, a random token."""

    host: str
    pid: int
    started: float | None
    acquired: float
    token: str

    @classmethod
    def current(cls) -> LockOwner:
        pid = os.getpid()
        return cls(socket.gethostname(), pid, process_start_time(pid), time.time(), secrets.token_hex(8))

    @classmethod
    def parse(cls, content: bytes) -> LockOwner | None:
        """The owner recorded in a lock file's content (None when unreadable, e.g. torn by a crash)."""
        try:
            data = json.loads(content.decode())
            return cls(
                str(data["host"]), int(data["pid"]), data.get("started"), float(data["acquired"]), data["token"]
            )
        except (ValueError, KeyError, TypeError):
            return None

    def to_bytes(self) -> bytes:
        return (json.dumps(asdict(self), sort_keys=True) + "\n").encode()

    def alive(self) -> bool | None:
        """True/False for an owner on this host; None when it cannot be told from here (another host)."""
        if self.host != socket.gethostname():
            return None
        return pid_running(self.pid, self.started)

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.acquired))
        return f"pid {self.pid} on host {self.host} (holding it since {since})"


class FileLock:
    """An exclusive lock file that records its owner; see the module docstring for the rules.

    Args:
        path: the lock file (created on acquire, removed on release).
        timeout: seconds to wait for a live owner before raising `LockTimeout`.
        poll: seconds between attempts while waiting.
        stale_after: a lock whose owner cannot be checked (another host) is stale when its file
            has not been touched for this long; must be well above `heartbeat`.
        heartbeat: seconds between touches of the file while it is held.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        timeout: float = 600.0,
        poll: float = 0.1,
        stale_after: float = 60.0,
        heartbeat: float = 10.0,
    ):
        if stale_after <= heartbeat:
            raise ValueError("stale_after must be longer than heartbeat")
        self.path = Path(path)
        self.timeout, self.poll, self.stale_after, self.heartbeat = timeout, poll, stale_after, heartbeat
        self.owner: LockOwner | None = None
        self._fd: int | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # -- acquire / release -------------------------------------------------------------
    def acquire(self) -> FileLock:
        """Take the lock: at once when free, after a takeover when its owner is gone, else wait."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this FileLock")
        deadline = time.monotonic() + self.timeout
        seen: tuple[bytes, int] | None = None  # (content, mtime) last seen, and since when (monotonic)
        seen_since = time.monotonic()
        told = False
        while True:
            if self._try_create():
                return self
            state = self._read()
            if state is None:
                continue  # released between our attempt and the read
            content, mtime = state
            if state != seen:
                seen, seen_since = state, time.monotonic()
            owner = LockOwner.parse(content)
            alive = owner.alive() if owner is not None else None
            untouched = time.monotonic() - seen_since
            if alive is False or (alive is None and untouched >= self.stale_after):
                self._take_over(content, mtime, owner, untouched)
                continue
            if time.monotonic() >= deadline:
                raise LockTimeout(
                    f"{self.path} is held by {owner.describe() if owner else 'an unknown process'}; gave up after "
                    f"{self.timeout:.0f} s. If that process is gone, delete {self.path} and run again."
                )
            if not told:
                logger.warning(
                    "waiting for %s: held by %s (up to %.0f s)",
                    self.path,
                    owner.describe() if owner else "an unknown process",
                    self.timeout,
                )
                told = True
            time.sleep(self.poll)

    def release(self) -> None:
        """Give the lock back (remove the file, unless another process took it over meanwhile)."""
        if self._fd is None:
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        fd, self._fd = self._fd, None
        try:
            mine = os.fstat(fd)
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            if current is not None and (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev):
                os.unlink(self.path)
            else:
                logger.warning("%s was taken over by another process while this one held it", self.path)
        finally:
            os.close(fd)
            self.owner = None

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    # -- internals -----------------------------------------------------------------------
    def _try_create(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        except FileExistsError:
            return False
        owner = LockOwner.current()
        os.write(fd, owner.to_bytes())
        os.fsync(fd)
        self._fd, self.owner = fd, owner
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, args=(fd,), daemon=True, name=f"lock {self.path.name}")
        self._beat.start()
        return True

    def _heartbeat(self, fd: int) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                os.utime(fd)  # our own inode, even if the path was taken over
            except OSError:
                return

    def _read(self) -> tuple[bytes, int] | None:
        try:
            with open(self.path, "rb") as f:
                return f.read(), os.fstat(f.fileno()).st_mtime_ns
        except FileNotFoundError:
            return None

    def _take_over(self, content: bytes, mtime: int, owner: LockOwner | None, untouched: float) -> None:
        """Remove the lock file left by a gone owner, if it is still the very file judged stale."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)  # one taker per stale file; released when fd closes
            mine = os.fstat(fd)
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                return  # another process took it over and already released it
            if (current.st_ino, current.st_dev) != (mine.st_ino, mine.st_dev) or mine.st_mtime_ns != mtime:
                return  # replaced or touched since we judged it: judge again
            os.lseek(fd, 0, os.SEEK_SET)
            if os.read(fd, len(content) + 1) != content:
                return
            os.unlink(self.path)
        finally:
            os.close(fd)
        if owner is None:
            why = f"its owner is unreadable and it was not touched for {untouched:.0f} s"
        elif owner.alive() is False:
            why = "that process is gone"
        else:
            why = f"it was not touched for {untouched:.0f} s"
        who = owner.describe() if owner else "an unknown process"
        logger.warning("took over %s left by %s: %s", self.path, who, why)
