"""Who owns a running trial, and whether it is still alive (search/storage.py, via psutil)."""

import subprocess
import sys
import time

from hcomposer.search.storage import owner_alive, owner_record


def test_this_process_is_alive():
    me = owner_record()
    assert isinstance(me["start"], float)
    assert owner_alive(me) is True


def test_other_host_cannot_tell():
    assert owner_alive({**owner_record(), "host": "elsewhere.invalid"}) is None
    assert owner_alive(None) is None


def test_reused_pid_is_not_the_owner():
    me = owner_record()
    assert owner_alive({**me, "start": me["start"] - 1000.0}) is False


def test_record_from_before_psutil_is_still_read():
    # Older records kept the kernel's clock ticks as text; the pid alone decides then.
    assert owner_alive({**owner_record(), "start": "123456"}) is True


def test_exited_and_zombie_processes_are_dead():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    record = {**owner_record(), "pid": child.pid, "start": None}
    # Not yet reaped: a zombie until wait() below.
    for _ in range(100):
        if owner_alive(record) is False:
            break
        time.sleep(0.05)
    assert owner_alive(record) is False
    child.wait()
    assert owner_alive(record) is False
