"""FileLock: owner recorded, dead owners taken over with a warning, live ones waited for, never two holders."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from hf_datasel.locks import FileLock, LockOwner, LockTimeout, pid_running, process_start_time
from hf_datasel.store import StoreError


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def write_owner(path, **fields) -> None:
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": process_start_time(os.getpid())}
    owner.update({"acquired": time.time(), "token": "t0", **fields})
    path.write_text(json.dumps(owner))


def test_the_lock_file_names_its_owner_and_goes_away_on_release(tmp_path):
    path = tmp_path / "merge.lock"
    with FileLock(path) as lock:
        owner = json.loads(path.read_text())
        assert owner["host"] == socket.gethostname() and owner["pid"] == os.getpid()
        assert abs(owner["started"] - process_start_time(os.getpid())) < 1e-6 and owner["token"] == lock.owner.token
    assert not path.exists()


def test_a_dead_owners_lock_is_taken_over_at_once_with_a_warning(tmp_path, caplog):
    path = tmp_path / "merge.lock"
    pid = dead_pid()
    write_owner(path, pid=pid, started=None)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="hf_datasel.locks"):
        with FileLock(path, timeout=5) as lock:
            assert LockOwner.parse(path.read_bytes()) == lock.owner
    assert time.monotonic() - started < 2
    assert f"took over {path} left by pid {pid}" in caplog.text and "that process is gone" in caplog.text


def test_a_reused_pid_is_not_mistaken_for_the_owner(tmp_path, caplog):
    path = tmp_path / "merge.lock"
    write_owner(path, started=process_start_time(os.getpid()) - 3600)  # "this pid", but a process an hour older
    assert not pid_running(os.getpid(), process_start_time(os.getpid()) - 3600)
    with caplog.at_level(logging.WARNING, logger="hf_datasel.locks"), FileLock(path, timeout=5):
        pass
    assert "took over" in caplog.text


def test_a_live_owner_is_waited_for_then_timed_out_with_a_message(tmp_path, caplog):
    path = tmp_path / "merge.lock"
    write_owner(path)  # this very process: alive
    with caplog.at_level(logging.WARNING, logger="hf_datasel.locks"), pytest.raises(LockTimeout) as err:
        FileLock(path, timeout=0.3, poll=0.05).acquire()
    assert isinstance(err.value, StoreError)
    message = str(err.value)
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in message and f"delete {path}" in message
    assert "waiting for" in caplog.text and caplog.text.count("waiting for") == 1
    assert path.exists()  # a live owner's lock is never removed


def test_a_waiter_gets_the_lock_when_the_owner_releases_it(tmp_path):
    path = tmp_path / "merge.lock"
    held, order = threading.Event(), []

    def owner():
        with FileLock(path):
            held.set()
            time.sleep(0.3)
            order.append("owner done")

    thread = threading.Thread(target=owner)
    thread.start()
    held.wait()
    with FileLock(path, timeout=5, poll=0.02):
        order.append("waiter in")
    thread.join()
    assert order == ["owner done", "waiter in"]


def test_another_hosts_lock_is_stale_only_when_its_heartbeat_stops(tmp_path, caplog):
    path = tmp_path / "merge.lock"
    write_owner(path, host="elsewhere", pid=1)
    beating = threading.Event()

    def heartbeat():
        while not beating.is_set():
            os.utime(path)
            time.sleep(0.05)

    thread = threading.Thread(target=heartbeat)
    thread.start()
    try:
        with pytest.raises(LockTimeout, match="host elsewhere"):
            FileLock(path, timeout=1.0, poll=0.05, stale_after=0.4, heartbeat=0.1).acquire()
    finally:
        beating.set()
        thread.join()
    with caplog.at_level(logging.WARNING, logger="hf_datasel.locks"):
        with FileLock(path, timeout=5, poll=0.05, stale_after=0.4, heartbeat=0.1):
            pass
    assert "not touched for" in caplog.text


def test_a_torn_lock_file_is_taken_over_once_it_stays_untouched(tmp_path):
    path = tmp_path / "merge.lock"
    path.write_text('{"host": "x", "pi')  # killed while writing its owner
    started = time.monotonic()
    with FileLock(path, timeout=5, poll=0.05, stale_after=0.3, heartbeat=0.1):
        assert time.monotonic() - started >= 0.3


def test_the_holder_touches_its_lock_while_it_holds_it(tmp_path):
    path = tmp_path / "merge.lock"
    with FileLock(path, heartbeat=0.05, stale_after=1.0):
        first = path.stat().st_mtime_ns
        time.sleep(0.3)
        assert path.stat().st_mtime_ns > first


def _contend(path: str, log: str, rounds: int) -> None:
    for _ in range(rounds):
        with FileLock(path, timeout=30, poll=0.001):
            with open(log, "a") as f:
                f.write(f"in {os.getpid()}\n")
            time.sleep(0.002)
            with open(log, "a") as f:
                f.write(f"out {os.getpid()}\n")


def test_processes_racing_for_a_stale_lock_never_hold_it_together(tmp_path):
    path, log = tmp_path / "merge.lock", tmp_path / "log"
    write_owner(path, pid=dead_pid(), started=None)
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold torch threads
    workers = [context.Process(target=_contend, args=(str(path), str(log), 15)) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0, 0, 0]
    lines = log.read_text().splitlines()
    assert len(lines) == 4 * 15 * 2
    for enter, leave in zip(lines[::2], lines[1::2]):  # strictly alternating: one holder at a time
        assert enter.startswith("in ") and leave == "out " + enter[3:]
    assert not path.exists()


def test_a_holder_that_was_taken_over_leaves_the_new_lock_alone(tmp_path, caplog):
    path = tmp_path / "merge.lock"
    lock = FileLock(path).acquire()
    path.unlink()
    write_owner(path, token="someone else")
    with caplog.at_level(logging.WARNING, logger="hf_datasel.locks"):
        lock.release()
    assert json.loads(path.read_text())["token"] == "someone else" and "was taken over" in caplog.text
