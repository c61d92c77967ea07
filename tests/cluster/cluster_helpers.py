"""A real multi-node Ray cluster on this machine for the tests: `ray start` processes on loopback
addresses (127.0.0.1 for the head, 127.0.0.2, ... for workers), token authentication on as Ray 2.60
clusters have it, a temporary folder of their own, and a teardown that stops only these processes."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalCluster:
    """A head and its workers started with `ray start`; `env` is what a client needs to join it."""

    temp_dir: Path
    port: int
    env: dict[str, str]
    workers: list[str] = field(default_factory=list)
    head_ip: str = "127.0.0.1"  # as Ray reports it: it may name the machine's address instead

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @classmethod
    def start(cls, temp_dir: Path, head_cpus: int) -> LocalCluster:
        env = os.environ | {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": uuid.uuid4().hex,  # this cluster's own token: ~/.ray is left alone
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        cluster = cls(temp_dir, free_port(), env)
        started = cluster._ray_start(
            "--head",
            f"--port={cluster.port}",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={temp_dir}",
            f"--num-cpus={head_cpus}",
            "--include-dashboard=false",
        )
        found = re.search(r"ray start --address='([^':]+):", started)
        cluster.head_ip = found[1] if found else cluster.head_ip
        return cluster

    def add_worker(self, ip: str, cpus: int) -> None:
        self._ray_start(f"--address={self.address}", f"--node-ip-address={ip}", f"--num-cpus={cpus}")
        self.workers.append(ip)
        self.wait_for_nodes(1 + len(self.workers))

    def _ray_start(self, *args: str) -> str:
        run = subprocess.run(
            [RAY, "start", "--disable-usage-stats", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        return run.stdout + run.stderr

    def alive_nodes(self) -> int:
        run = subprocess.run(
            [RAY, "status", f"--address={self.address}"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        active = run.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
        return sum(1 for line in active.splitlines() if "node_" in line)

    def wait_for_nodes(self, count: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while self.alive_nodes() != count:
            assert time.monotonic() < deadline, f"the cluster did not reach {count} nodes"
            time.sleep(1)

    def processes(self, ip: str | None = None) -> list[psutil.Process]:
        """This cluster's processes (all, or those of the node at `ip`: its raylet and its workers)."""
        ours = []
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(proc.info["cmdline"] or [])
            if str(self.temp_dir) in cmdline or f"127.0.0.1:{self.port}" in cmdline:
                ours.append(proc)
        if ip is None:
            return ours
        raylets = [
            p
            for p in ours
            if "raylet" in " ".join(p.cmdline()) and f"--node_ip_address={ip}" in " ".join(p.cmdline())
        ]
        return raylets + [child for r in raylets for child in r.children(recursive=True)]

    def kill_node(self, ip: str) -> None:
        """What losing a machine looks like: its raylet and every process under it killed at once."""
        for proc in self.processes(ip):
            with_suppressed(proc.send_signal, signal.SIGKILL)
        self.workers.remove(ip)

    def stop(self) -> None:
        for proc in self.processes():
            with_suppressed(proc.send_signal, signal.SIGKILL)


def with_suppressed(call, *args) -> None:
    with contextlib.suppress(psutil.Error):  # gone already
        call(*args)
