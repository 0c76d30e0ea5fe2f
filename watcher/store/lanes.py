"""The claim order both adapters follow: due work already at the service first, new work never starved.

A pipeline's pending jobs stand in one of two *lanes*, each with its own partial index (schema version 6 in
SQLite, 2 in PostgreSQL), so a claim or a next-due reads only the few rows at the head of a lane:

- ``in_flight``: jobs whose remote work is under way, at the steps in :data:`IN_FLIGHT_STEPS` (archive's
  ``process``: request versions and poll their status; ``fetch``: deliver). Serving them first turns paid work
  into deliveries and keeps a poll near its due time;
- ``new``: every other step (archive's ``check`` and ``upload``, analyze's only step): work not started yet.

Within a lane the order is the old one: most overdue first (``next_attempt_at``, then ``id``). Between lanes,
:class:`ClaimOrder` alternates fairly: the in-flight lane goes first, but after :data:`IN_FLIGHT_RUN` in-flight
claims in a row the next claim tries the new lane first (when none is due there, the run simply starts again).
So with thousands of polls due, new uploads still get at least one claim in ``IN_FLIGHT_RUN + 1``; with thousands
of uploads due, a poll that falls due is the very next claim (uploads reset the run). A pipeline with one lane
(analyze) is claimed exactly as before.

Why a counted alternation and not aging ("an upload due for more than X seconds goes first"): aging turns into
plain oldest-first exactly when a backlog is large, the moment the priority matters (thousands of files dropped
an hour ago would all be "aged" and polls would wait behind them), and it needs a second clock in the order.
A count bounds both sides' share whatever the backlog, and a test can check it without a clock. The run is
counted per store object (one per daemon): on a shared PostgreSQL store each node keeps its own alternation,
which keeps the same bounds for each node's claims; a restart only restarts the count.

Within the new lane, today's files go first: a job carries its folder's ``priority`` (higher first) and whether its
file was found *live* (an event, a poll, `watcher scan PATH`, or a scan finding a file modified within the folder's
``live_hours``) rather than as backlog; `watcher scan PATH` on files recorded earlier makes their pending jobs live
(``promote``). The new lane is read in :data:`FIRST` order (priority, then live, then most
overdue) through its own partial index (schema version 10 in SQLite, 6 in PostgreSQL), except that every
``FIRST_RUN + 1``-th new-lane claim takes the most overdue job whatever its rank (:data:`OLDEST`): the backlog keeps
at least one claim in ``FIRST_RUN + 1``, so a steady stream of live files never starves it.
"""

from __future__ import annotations

import threading

from watcher.store.models import Step

IN_FLIGHT_STEPS = (Step.PROCESS, Step.FETCH)
IN_FLIGHT_RUN = 3  # in-flight claims in a row while new work may wait; then new work goes first once
# The lanes' conditions, written exactly as the partial indexes' predicates (a query must repeat a partial
# index's condition to use it); ``j`` is the jobs table's alias in every query.
LANES = {
    "in_flight": "j.step IN ('process', 'fetch')",
    "new": "j.step NOT IN ('process', 'fetch')",
}
FIRST_RUN = 3  # new-lane claims in rank order in a row; then the most overdue new job goes first once
OLDEST = "j.next_attempt_at, j.id"  # the in-flight lane's order, and the new lane's every FIRST_RUN + 1-th claim
FIRST = "j.priority DESC, j.live DESC, j.next_attempt_at, j.id"  # the new lane's order otherwise (jobs_due_first)


class ClaimOrder:
    """Which lane a pipeline's next claim tries first; told of each claim made (thread-safe)."""

    def __init__(self, run: int = IN_FLIGHT_RUN, first_run: int = FIRST_RUN) -> None:
        self.run = run
        self.first_run = first_run
        self._streak: dict[str, int] = {}  # pipeline -> in-flight claims since the last new one
        self._ranked: dict[str, int] = {}  # pipeline -> new-lane claims in rank order since the last oldest-first
        self._lock = threading.Lock()

    def lanes(self, pipeline: str) -> tuple[str, str]:
        """The two lanes of ``pipeline`` in the order this claim tries them."""
        with self._lock:
            turn = self._streak.get(pipeline, 0) >= self.run
        return ("new", "in_flight") if turn else ("in_flight", "new")

    def order(self, pipeline: str, lane: str) -> str:
        """The ORDER BY of ``lane``'s claim query for ``pipeline``'s next claim (see the module docstring)."""
        if lane != "new":
            return OLDEST
        with self._lock:
            return OLDEST if self._ranked.get(pipeline, 0) >= self.first_run else FIRST

    def claimed(self, pipeline: str, lanes: tuple[str, str], lane: str) -> None:
        """A job of ``lane`` was claimed, trying ``lanes`` in this order: the in-flight run grows, or new work had
        its turn (served, or none was due) and the run starts again."""
        with self._lock:
            turn = lane == "new" or lanes[0] == "new"
            self._streak[pipeline] = 0 if turn else self._streak.get(pipeline, 0) + 1
            if lane == "new":
                ranked = self._ranked.get(pipeline, 0)
                self._ranked[pipeline] = 0 if ranked >= self.first_run else ranked + 1
