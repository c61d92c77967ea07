"""The caption job's resource plan: what it reserves, checked against the cluster before any work and
held for the whole run.

The job runs two actor pools: decode workers (1 CPU each) and model replicas (`cpus_per_replica`,
`gpus_per_replica`). Reading the manifest and committing shards are short I/O tasks that need no CPU of
their own (`num_cpus=0`, a few at a time): they must never wait for CPUs the actor pools hold, which is
how a job used to hang at 0 rows when the pools took every CPU of the cluster.

Before any work, `check_plan` places every actor on the cluster's alive nodes by their total resources
(best fit, GPU actors first) and refuses a plan that cannot fit, naming the numbers and the settings to
change. Then `reserve` holds each pool in a placement group, models first, so that Ray places the
scarce GPU actors before the decode workers take the CPUs of the GPU nodes, and the whole plan is either
reserved or refused (after `resource_wait_s`, naming what other jobs hold), never half started.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ovis_batch.errors import UsageError

IO_TASKS_IN_FLIGHT = 2  # manifest read tasks and shard writes at a time (each needs no CPU of its own)
_EPSILON = 1e-9


class ResourcePlanError(UsageError, RuntimeError):
    """A plan the cluster cannot hold; the message names the numbers and the settings to change."""


@dataclass(frozen=True)
class Pool:
    """One actor pool of the job: `actors` actors of `cpus` CPUs and `gpus` GPUs each."""

    name: str
    actors: int
    cpus: float
    gpus: float
    settings: str  # the settings that size it, for messages

    def bundle(self) -> dict[str, float]:
        return {k: v for k, v in (("CPU", self.cpus), ("GPU", self.gpus)) if v > 0}

    def describe(self) -> str:
        each = f"{_number(self.cpus)} CPU" + (f" + {_number(self.gpus)} GPU" if self.gpus else "")
        return f"{self.actors} {self.name} x ({each})"


@dataclass(frozen=True)
class Node:
    """An alive node's total resources."""

    address: str
    cpus: float
    gpus: float

    def describe(self) -> str:
        return f"{self.address}: {_number(self.cpus)} CPU" + (
            f", {_number(self.gpus)} GPU" if self.gpus else ""
        )


def job_pools(
    *, decode_workers: int, replicas: int, cpus_per_replica: float, gpus_per_replica: float
) -> list[Pool]:
    """The caption job's actor pools, model replicas first (the order they are reserved in)."""
    return [
        Pool(
            "model replicas",
            replicas,
            cpus_per_replica,
            gpus_per_replica,
            "replicas, cpus_per_replica, gpus_per_replica",
        ),
        Pool("decode workers", decode_workers, 1.0, 0.0, "decode_workers"),
    ]


def plan_cpus(pools: list[Pool]) -> float:
    """Logical CPUs the pools hold (a local Ray is started with at least this many)."""
    return sum(p.actors * p.cpus for p in pools)


def alive_nodes() -> list[Node]:
    """The connected cluster's alive nodes and their total CPUs and GPUs."""
    import ray

    return [
        Node(
            str(n.get("NodeManagerAddress") or n.get("NodeID", "?")[:12]),
            float(n["Resources"].get("CPU", 0)),
            float(n["Resources"].get("GPU", 0)),
        )
        for n in ray.nodes()
        if n.get("Alive")
    ]


def check_plan(pools: list[Pool], nodes: list[Node]) -> None:
    """Refuse (ResourcePlanError) a plan whose actors cannot all be placed on `nodes` at once.

    Best fit, largest actors first (GPU actors before CPU-only ones): a plan this refuses cannot run;
    one it accepts is then reserved by Ray itself (`reserve`).
    """
    free = [[node.cpus, node.gpus] for node in nodes]
    actors = sorted(
        (pool for pool in pools for _ in range(pool.actors)), key=lambda p: (p.gpus, p.cpus), reverse=True
    )
    for pool in actors:
        fits = [
            i
            for i, (cpus, gpus) in enumerate(free)
            if cpus + _EPSILON >= pool.cpus and gpus + _EPSILON >= pool.gpus
        ]
        if not fits:
            raise ResourcePlanError(_refusal(pools, nodes, pool))
        best = min(fits, key=lambda i: (free[i][1] - pool.gpus, free[i][0] - pool.cpus))
        free[best][0] -= pool.cpus
        free[best][1] -= pool.gpus


def _refusal(pools: list[Pool], nodes: list[Node], unplaced: Pool) -> str:
    need_cpus = plan_cpus(pools)
    need_gpus = sum(p.actors * p.gpus for p in pools)
    have_cpus, have_gpus = sum(n.cpus for n in nodes), sum(n.gpus for n in nodes)
    largest = max(((n.cpus, n.gpus) for n in nodes), default=(0.0, 0.0))
    if unplaced.cpus > largest[0] + _EPSILON or unplaced.gpus > largest[1] + _EPSILON:
        why = f"one of the {unplaced.name} needs more than any node has"
    else:
        why = f"not every one of the {unplaced.name} finds room once the others are placed"
    return (
        f"the job's actors do not fit the Ray cluster ({why}): it needs "
        f"{' + '.join(p.describe() for p in pools)} = {_number(need_cpus)} CPU"
        + (f" and {_number(need_gpus)} GPU" if need_gpus else "")
        + f"; the cluster has {_number(have_cpus)} CPU"
        + (f" and {_number(have_gpus)} GPU" if have_gpus else "")
        + f" ({'; '.join(sorted(n.describe() for n in nodes)) or 'no alive node'}). "
        f"Lower {' or '.join(p.settings for p in pools)}, or add nodes"
    )


@contextlib.contextmanager
def reserve(pools: list[Pool], wait_s: float) -> Iterator[dict[str, Callable[[], dict[str, Any]]]]:
    """Hold every pool in a placement group of its own (models first) for the duration; yields, for each
    pool name, a function of the Ray options that schedule its actors into its group (Ray Data's
    `ray_remote_args_fn`). Refuses (ResourcePlanError) when
    the groups are not placed within `wait_s` seconds (resources held by other jobs, nodes not joined)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    groups = []
    deadline = time.monotonic() + wait_s
    try:
        for pool in pools:
            if pool.actors == 0:
                continue
            group = placement_group(
                [pool.bundle()] * pool.actors, strategy="PACK", name=f"ovis-batch {pool.name}"
            )
            groups.append((pool, group))
            ready, _ = ray.wait([group.ready()], timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise ResourcePlanError(
                    f"could not reserve {pool.describe()} within {_number(wait_s)} s: the cluster has "
                    f"{_resources(ray.available_resources())} free of {_resources(ray.cluster_resources())} "
                    "(other jobs hold the rest, or nodes have not joined yet). Wait for them, lower "
                    f"{pool.settings}, or raise resource_wait_s"
                )
        yield {pool.name: functools.partial(_into_group, group) for pool, group in groups}
    finally:
        for _, group in groups:
            with contextlib.suppress(Exception):  # the cluster may be gone: nothing left to free
                remove_placement_group(group)


def _into_group(group: Any) -> dict[str, Any]:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            group, placement_group_capture_child_tasks=False
        )
    }


def _resources(resources: dict[str, float]) -> str:
    parts = [f"{_number(resources.get(k, 0))} {k}" for k in ("CPU", "GPU") if k == "CPU" or resources.get(k)]
    return ", ".join(parts)


def _number(value: float) -> str:
    return f"{value:g}"
