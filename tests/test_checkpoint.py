"""The output folder's lock: one run at a time; stale locks of dead local processes are taken
over; a lock from another host is refused with the host and the way out named."""

import os
import socket

import pytest

from dask_refine.io.errors import InputError
from dask_refine.jobs.checkpoint import RunLock
from helpers import dead_pid


def test_lock_records_host_and_pid_and_is_released(tmp_path):
    with RunLock(tmp_path):
        assert (tmp_path / ".lock").read_text() == f"{socket.gethostname()} {os.getpid()}"
        with pytest.raises(InputError, match="another run"):
            RunLock(tmp_path).__enter__()
    assert not (tmp_path / ".lock").exists()


@pytest.mark.parametrize("content", ["{pid}", "{host} {pid}"])
def test_stale_lock_of_a_dead_local_process_is_taken_over(tmp_path, content):
    (tmp_path / ".lock").write_text(content.format(host=socket.gethostname(), pid=dead_pid()))
    with RunLock(tmp_path):
        assert (tmp_path / ".lock").read_text().endswith(str(os.getpid()))


def test_lock_from_another_host_is_refused_with_the_way_out(tmp_path):
    (tmp_path / ".lock").write_text("refine-pod-7f9c 1")
    with pytest.raises(InputError, match="refine-pod-7f9c.*delete"):
        with RunLock(tmp_path):
            pass
    assert (tmp_path / ".lock").read_text() == "refine-pod-7f9c 1"  # left for the user
