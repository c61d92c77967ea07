"""The lease that keeps one writer per folder, on a local disk and on an S3 server: refusal naming the
holder, waiting, renewal, expiry, a dead holder on this machine, a lost lease, and racing takers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from ovis_batch.lease import Lease, LeaseError, LeaseHeldError
from ovis_batch.storage import location


@pytest.fixture(params=["local", "s3"])
def folder(request, tmp_path):
    if request.param == "local":
        return location(tmp_path / "out")
    return location(request.getfixturevalue("bucket")).join(f"out-{os.urandom(4).hex()}")


def lease(folder, **kwargs):
    kwargs.setdefault("timeout_s", 30)
    return Lease(folder.join("_lease.json"), what="caption job", **kwargs)


def test_a_second_holder_is_refused_with_the_holder_named(folder):
    with lease(folder) as first:
        record = json.loads(folder.join("_lease.json").read_bytes())
        assert (record["token"], record["host"], record["pid"]) == (
            first.token,
            socket.gethostname(),
            os.getpid(),
        )
        with pytest.raises(LeaseHeldError) as refused:
            lease(folder, busy_hint="pass --wait-for-lease to wait").acquire()
    message = str(refused.value)
    assert message.startswith(f"{folder} is in use by another caption job: host {socket.gethostname()}, ")
    assert (
        f"pid {os.getpid()}, started {record['started']}; its lease expires at {record['expires']}" in message
    )
    assert message.endswith("Pass --wait-for-lease to wait")
    assert not folder.join("_lease.json").exists()  # released at the end
    with lease(folder):  # and free again
        pass


def test_a_waiting_holder_takes_the_lease_when_the_first_releases_it(folder):
    notes, order = [], []
    first = lease(folder, timeout_s=5).__enter__()

    def second():
        with lease(folder, timeout_s=5, wait=True, notify=notes.append):  # looks again every 0.5 s
            order.append("second")

    waiter = threading.Thread(target=second)
    waiter.start()
    time.sleep(1.0)
    assert order == [] and len(notes) == 1 and notes[0].startswith(f"waiting: {folder} is in use by another")
    order.append("first released")
    first.__exit__(None, None, None)
    waiter.join(30)
    assert order == ["first released", "second"]


def test_renewal_keeps_the_lease_past_its_timeout_and_expiry_frees_it(folder):
    with lease(folder, timeout_s=1.0) as held:
        first_expiry = held.expires_at
        time.sleep(1.5)  # longer than the timeout: renewals (every 1/3 s) keep it
        assert held.expires_at > first_expiry
        with pytest.raises(LeaseHeldError):
            lease(folder).acquire()
        held.ensure_held()

    # A holder on another machine that stopped renewing: only the expiry frees its lease.
    expires = time.time() + 1
    other = {"token": "x", "what": "caption job", "host": "other-node", "pid": 1, "expires_at": expires}
    folder.join("_lease.json").write_bytes(json.dumps(other).encode())
    with pytest.raises(LeaseHeldError, match="host other-node, pid 1"):
        lease(folder).acquire()
    with lease(folder, wait=True):
        assert time.time() >= expires


def test_a_killed_holder_on_this_machine_is_replaced_at_once(folder, s3_env):
    code = (
        "import sys, time\n"
        "from ovis_batch.lease import Lease\n"
        "from ovis_batch.storage import location\n"
        "Lease(location(sys.argv[1]), what='caption job', timeout_s=600).__enter__()\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, folder.join("_lease.json").uri], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeldError, match=f"pid {holder.pid}, "):
            lease(folder).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    started = time.monotonic()
    with lease(folder):  # the holder's lease has 600 s left, but its process is gone
        assert time.monotonic() - started < 5


def test_a_lease_taken_over_after_failed_renewals_is_reported_lost(folder):
    held = lease(folder, timeout_s=0.9).__enter__()
    taker = {
        "token": "other",
        "what": "caption job",
        "host": "other-node",
        "pid": 7,
        "expires_at": time.time() + 60,
    }
    folder.join("_lease.json").write_bytes(json.dumps(taker).encode())
    time.sleep(0.8)  # a renewal (every 0.3 s) reads the file and finds another token
    with pytest.raises(LeaseError, match=r"was lost while this caption job ran: another caption job took it"):
        held.ensure_held()
    held.__exit__(None, None, None)
    assert json.loads(folder.join("_lease.json").read_bytes())["token"] == "other"  # not ours to delete


def test_takers_racing_for_a_free_lease_end_with_one_holder(tmp_path):
    folder = location(tmp_path / "race")
    for _ in range(5):
        results: list[str] = []
        gate = threading.Barrier(3)

        def take(results=results, gate=gate):
            candidate = lease(folder)
            gate.wait()
            try:
                candidate.acquire()
                results.append(candidate.token)
            except LeaseHeldError:
                results.append("refused")

        takers = [threading.Thread(target=take) for _ in range(3)]
        for taker in takers:
            taker.start()
        for taker in takers:
            taker.join(30)
        winners = [r for r in results if r != "refused"]
        assert len(results) == 3 and len(winners) == 1
        assert json.loads(folder.join("_lease.json").read_bytes())["token"] == winners[0]
        folder.join("_lease.json").delete()
