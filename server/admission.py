"""Deadline-aware admission: a caller that will not be served in time learns it at once.

The scheduler measures the rows (accepted records) it delivers per second while it has work
(`RowRate`). When a request arrives with a deadline, `Admission.check` estimates when it would
be done: the rows still owed to the requests already in flight (they are ahead of it: rounds
start in arrival order) plus its own rows, at the measured rate. If that is later than
`deadline_share` of the time its caller has left, it is refused with RESOURCE_EXHAUSTED and a
`retry-after` hint: how long the same caller, its deadline unchanged, should wait before the
work ahead has drained enough for its call to be admitted (or the server to be idle). The
caller can go to another replica, come back then, or give up at once when that is past its
deadline, instead of waiting out its deadline in the queue.

Rules that keep it safe:
- A request without a deadline is queued as before, up to `max_active_requests`.
- An idle server (no rows owed) admits every request: it starts at once, and no replica could
  serve it sooner.
- Until a rate has been measured, `prior_rows_per_second` stands in for it (a conservative
  guess: refusing a call that would have fitted costs the caller a retry; admitting one that
  will not fit costs it its deadline). The measured rate never counts as less than a quarter of
  the prior: one request whose rows all fail their checks for a while must not shut out every
  caller with a deadline.
- Requests once admitted are never shed: they run to the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from condgen.server.errors import Overloaded

RATE_FLOOR_SHARE = 0.25  # of the prior: the least the measured rate counts as


@dataclass(frozen=True)
class AdmissionConfig:
    """How the server decides that a request with a deadline cannot be served in time."""

    enabled: bool = True
    prior_rows_per_second: float = 1.0  # until the first measurement
    deadline_share: float = 0.8  # the estimate must end within this share of the caller's time left
    window_seconds: float = 2.0  # busy time per rate measurement

    def __post_init__(self) -> None:
        if self.prior_rows_per_second <= 0:
            raise ValueError("admission: prior_rows_per_second must be positive")
        if not 0 < self.deadline_share <= 1:
            raise ValueError("admission: deadline_share must be in (0, 1]")
        if self.window_seconds <= 0:
            raise ValueError("admission: window_seconds must be positive")


class RowRate:
    """Rows delivered per second of busy time: an exponential average over windows of
    `window_seconds` (half weight to the newest window); None before the first window."""

    def __init__(self, window_seconds: float):
        self.window_seconds = window_seconds
        self.rows_per_second: float | None = None
        self._rows = 0
        self._seconds = 0.0

    def observe(self, rows: int, seconds: float) -> None:
        """`rows` delivered in `seconds` during which the server had work."""
        self._rows += rows
        self._seconds += seconds
        if self._seconds < self.window_seconds:
            return
        latest = self._rows / self._seconds
        self.rows_per_second = latest if self.rows_per_second is None else 0.5 * (self.rows_per_second + latest)
        self._rows, self._seconds = 0, 0.0


class Admission:
    """Refuses requests whose caller's deadline the queue ahead would outlast."""

    def __init__(self, config: AdmissionConfig = AdmissionConfig()):
        self.config = config
        self.rate = RowRate(config.window_seconds)

    @property
    def rows_per_second(self) -> float:
        prior = self.config.prior_rows_per_second
        measured = self.rate.rows_per_second
        return prior if measured is None else max(measured, RATE_FLOOR_SHARE * prior)

    def estimate_seconds(self, rows_ahead: int, own_rows: int) -> float:
        """Seconds until a request with `own_rows` behind `rows_ahead` would be done."""
        return (rows_ahead + own_rows) / self.rows_per_second

    def check(self, rows_ahead: int, own_rows: int, time_left: float | None) -> None:
        """Raise Overloaded (with `retry_after`) when the request would not be done in time."""
        if not self.config.enabled or time_left is None or rows_ahead == 0:
            return
        needed = self.estimate_seconds(rows_ahead, own_rows)
        share = self.config.deadline_share
        allowed = share * time_left
        if needed <= allowed:
            return
        # After waiting h (nobody else arriving): needed - h <= share * (time_left - h), or idle.
        until_fits = (needed - allowed) / (1 - share) if share < 1 else math.inf
        retry_after = min(rows_ahead / self.rows_per_second, until_fits)
        raise Overloaded(
            f"the server would not finish this request before its deadline: {rows_ahead} rows are owed "
            f"ahead of it, at {self.rows_per_second:.1f} rows/s about {needed:.0f} s with its own "
            f"{own_rows}, and the caller has {time_left:.0f} s; retry on another server or in "
            f"{retry_after:.0f} s",
            retry_after=retry_after,
        )
