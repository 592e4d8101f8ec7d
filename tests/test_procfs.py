"""The /proc kit (scripts/bench/procfs.py, on mpd's own mpd/system/procfs.py) against real
processes: children that run, exit and wait to be reaped, CPU that is burnt, memory that is
touched, fds that are opened."""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
import time

import procfs
import pytest
from conftest import ROOT, wait_until


@pytest.fixture
def sleeper():
    """A child that sleeps until killed, with a grandchild of its own."""
    proc = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                             "subprocess.Popen([sys.executable, '-c', "
                             "'import time; time.sleep(60)']); print('up', flush=True); "
                             "time.sleep(60)"], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
    (grandchild,) = wait_until(lambda: procfs.children(proc.pid), what="the grandchild")
    proc.grandchild = grandchild
    yield proc
    for pid in (grandchild, proc.pid):
        if procfs.alive(pid):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stdout.close()


def test_a_child_and_its_grandchild_are_found_and_told_apart(sleeper):
    grandchild = sleeper.grandchild
    assert sleeper.pid in procfs.children(os.getpid())
    assert procfs.tree(sleeper.pid) == [sleeper.pid, grandchild]
    assert procfs.stat(grandchild).ppid == sleeper.pid
    assert procfs.alive(sleeper.pid) and procfs.alive(grandchild)
    me, child = procfs.start_time(os.getpid()), procfs.start_time(sleeper.pid)
    assert me <= child <= time.clock_gettime(time.CLOCK_BOOTTIME) + 1


def test_an_exited_child_is_a_zombie_until_reaped_then_gone(sleeper):
    assert sleeper.pid not in procfs.zombies_of(os.getpid())
    os.kill(sleeper.pid, signal.SIGKILL)
    wait_until(lambda: sleeper.pid in procfs.zombies_of(os.getpid()), what="the zombie")
    assert not procfs.alive(sleeper.pid)
    assert procfs.stat(sleeper.pid).state == "Z"
    sleeper.wait(timeout=10)
    assert sleeper.pid not in procfs.zombies_of(os.getpid())
    for query in (procfs.stat, procfs.cpu_seconds, procfs.memory, procfs.fd_count,
                  procfs.children):
        with pytest.raises(ProcessLookupError):
            query(sleeper.pid)
    assert procfs.tree(sleeper.pid) == []
    assert procfs.total_cpu_seconds([sleeper.pid]) == 0.0


def test_cpu_seconds_count_what_the_process_burns():
    before = procfs.cpu_seconds(os.getpid())
    deadline = time.monotonic() + 30
    while procfs.cpu_seconds(os.getpid()) < before + 0.05:  # the clock ticks at CLK_TCK
        assert time.monotonic() < deadline, "no CPU time counted in 30 s of spinning"
        sum(range(10000))
    assert procfs.total_cpu_seconds([os.getpid(), os.getpid()]) >= 2 * (before + 0.05)
    mine = procfs.stat(os.getpid())
    assert mine.cpu_seconds == mine.user_seconds + mine.system_seconds
    assert mine.user_seconds > 0  # the spinning above is all user time


def test_memory_sees_pages_the_process_touches():
    size = 32 * 1024 * 1024
    before = procfs.memory(os.getpid())
    with mmap.mmap(-1, size) as block:
        for offset in range(0, size, mmap.PAGESIZE):
            block[offset] = 1
        during = procfs.memory(os.getpid())
        stat_rss = procfs.stat(os.getpid()).rss
    # Private anonymous pages: they count in RSS, PSS and USS alike.
    for field in ("rss", "pss", "uss"):
        assert getattr(during, field) - getattr(before, field) >= size * 0.9, field
    assert during.uss <= during.pss <= during.rss
    assert stat_rss >= size


def test_fd_count_follows_open_and_close():
    before = procfs.fd_count(os.getpid())
    r, w = os.pipe()
    assert procfs.fd_count(os.getpid()) == before + 2
    os.close(r)
    os.close(w)
    assert procfs.fd_count(os.getpid()) == before


def test_it_imports_with_the_bare_standard_library():
    """The benchmark driver imports it without mpd's dependencies: no site-packages (-S)."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import procfs; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('mpd', 'structlog', 'daemon')))")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code,
                          str(ROOT / "scripts" / "bench")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['mpd', 'mpd.system', 'mpd.system.procfs']"
