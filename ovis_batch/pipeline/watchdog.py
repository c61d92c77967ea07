"""The stall watchdog: a job that commits no row for a while says what Ray is waiting for, and past a limit
stops with a clear message instead of hanging at the same progress line all night.

`StallWatchdog` runs a thread beside the job. The job calls `committed()` for every shard; when none has
come for `report_s` seconds, the watchdog writes one line with what the cluster reports (resource demands
no node can take now, placement groups waiting, dead nodes), again every `report_s`; past `timeout_s`
it interrupts the job's thread, which leaves with `JobStalled` (a fault: committed rows are kept, a rerun
resumes). The first shard waits for the models to load, which counts as a stall like any other: set the
times above the model's load time plus one shard's work.
"""

from __future__ import annotations

import _thread
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ovis_batch.errors import RunFailure
from ovis_batch.progress import format_duration

# The signal number the watchdog's interruption is simulated under (`_thread.interrupt_main`: nothing is sent
# to the process). Not SIGINT: a job started in the background by a script (`ovis-batch caption ... &`)
# inherits SIGINT ignored, and Python then drops a simulated SIGINT too: the stall would never stop it.
STALL_SIGNAL = signal.SIGUSR2


class JobStalled(RunFailure):
    """No row committed for `stall_timeout_s`; the message says what Ray was waiting for."""


def what_ray_waits_for() -> str:
    """One phrase from the cluster's own status: unmet demands, pending placement groups, dead nodes."""
    try:
        import ray
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address)
        demands = status.resource_demands
        parts = [
            f"{request.count} x {_bundle(request.bundle)} for tasks/actors"
            for demand in demands.ray_task_actor_demand
            for request in demand.bundles_by_count
        ]
        parts += [
            f"a placement group of {' + '.join(_bundle(b.bundle) for b in group.bundles_by_count)}"
            for group in demands.placement_group_demand
        ]
        dead = sorted({node.ip_address for node in status.failed_nodes})
        if dead:
            parts.append(f"dead nodes {', '.join(dead)}")
    except Exception as exc:  # the status is a diagnosis: never let it stop the job
        return f"the cluster's status could not be read ({type(exc).__name__}: {exc})"
    if not parts:
        return (
            "nothing: no resource demand is pending, so the running stages are busy or stuck (see Ray's logs)"
        )
    return "; ".join(parts)


def _bundle(bundle: dict[str, float]) -> str:
    shown = {k: v for k, v in bundle.items() if not k.startswith(("node:", "bundle_group", "memory"))}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items())) + "}"


class StallWatchdog:
    """See the module docstring. `note` receives the report lines; `diagnose` says what Ray waits for."""

    def __init__(
        self,
        *,
        report_s: float,
        timeout_s: float | None,
        note: Callable[[str], None],
        diagnose: Callable[[], str] = what_ray_waits_for,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.report_s, self.timeout_s = report_s, timeout_s
        self._note, self._diagnose, self._clock = note, diagnose, clock
        self._last_commit = clock()
        self._last_report = self._last_commit
        self.stalled: str | None = None  # set when the watchdog stopped the job: why

    def committed(self) -> None:
        """A shard was committed: the job is moving."""
        self._last_commit = self._last_report = self._clock()

    def check(self) -> bool:
        """Report or stop if due; True when the job must stop (the caller interrupts it)."""
        now = self._clock()
        quiet_for = now - self._last_commit
        if self.timeout_s is not None and quiet_for >= self.timeout_s:
            self.stalled = (
                f"no row committed for {format_duration(quiet_for)} (stall_timeout_s={self.timeout_s:g}); "
                f"Ray was waiting for: {self._diagnose()}"
            )
            return True
        if now - self._last_report >= self.report_s:
            self._last_report = now
            self._note(
                f"stalled: no row committed for {format_duration(quiet_for)}; Ray is waiting for: {self._diagnose()}"
            )
        return False

    @contextmanager
    def watching(self, poll_s: float = 1.0) -> Iterator[StallWatchdog]:
        """Run the checks in a thread while the body runs in this one; a stall interrupts the body, which
        then raises `JobStalled`."""
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(poll_s):
                if self.check():
                    _thread.interrupt_main(STALL_SIGNAL)  # the job's thread is in Ray's wait
                    return

        def interrupt(signum, frame) -> None:
            if self.stalled is not None:  # a real SIGUSR2 from outside is not a stall: ignored
                raise KeyboardInterrupt  # as Ctrl-C does: Ray's wait lets it through, not its own errors

        in_main = threading.current_thread() is threading.main_thread()
        if in_main:
            previous = signal.signal(STALL_SIGNAL, interrupt)
        else:
            self.timeout_s = None  # only the main thread can be interrupted: report, never stop
        thread = threading.Thread(target=watch, name="stall-watchdog", daemon=True)
        thread.start()
        try:
            yield self
        except KeyboardInterrupt:
            if self.stalled is not None:
                raise JobStalled(self.stalled) from None
            raise
        finally:
            stop.set()
            thread.join()
            if in_main:
                signal.signal(STALL_SIGNAL, previous)
