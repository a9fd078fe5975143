"""Batching policies: which requests may start rounds, and whether a job wants another one.

`continuous` (the default, iteration-level batching): every request in flight may start rounds
whenever the batch has room, and a job keeps as many sequences running as its missing records
need. `static` (a baseline for benchmarks): whole requests at a time; a new group of requests
starts only when every request of the previous group has finished, and each request keeps a
fixed set of rows (one round per job at a time).
"""

from __future__ import annotations

from condgen.server.requests import Job, RequestState


class BatchingPolicy:
    """The continuous policy; subclasses change what differs."""

    name = "continuous"

    def admissible(self, requests: list[RequestState], max_batch_size: int) -> list[RequestState]:
        """The requests that may start rounds now, in order."""
        return list(requests)

    def wants_round(self, state: RequestState, job: Job) -> bool:
        """Whether `job` should start another round (the batch's room is checked elsewhere)."""
        if not state.may_start_round(job):
            return False
        lines_per_sequence = max(1.0, state.spec.max_new_tokens / job.tokens_per_line)
        in_flight = len(job.active) * lines_per_sequence
        return in_flight < job.target - job.accepted


class StaticPolicy(BatchingPolicy):
    """Whole requests at a time, a fixed set of rows each."""

    name = "static"

    def __init__(self) -> None:
        self._group: set[int] = set()

    def admissible(self, requests: list[RequestState], max_batch_size: int) -> list[RequestState]:
        group = [r for r in requests if r.id in self._group]
        if not group and requests:
            widest = max(r.spec.sequences_per_round for r in requests)
            group = requests[: max(1, max_batch_size // widest)]
            self._group = {r.id for r in group}
        return group

    def wants_round(self, state: RequestState, job: Job) -> bool:
        return state.may_start_round(job) and not job.active


POLICIES: dict[str, type[BatchingPolicy]] = {"continuous": BatchingPolicy, "static": StaticPolicy}


def make_policy(name: str) -> BatchingPolicy:
    return POLICIES[name]()
