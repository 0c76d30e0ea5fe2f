"""The PostgreSQL adapter: the same store ports as SQLite, shared by several daemons on several machines.

Design (see README "Several machines"):

- Claims take ``SELECT ... FOR UPDATE SKIP LOCKED`` on the due job and stamp a lease computed by the database
  (``now()``); the runner's lease keeper renews leases; an expired lease (a dead node) is simply claimable again by
  the next claim: there is no sweeper. The node's own clock never decides a lease: a ``next_attempt_at`` it passes
  is turned into a delay from its own now, and due times handed back are delays added to its own now, so a node
  whose clock is off or stepped neither steals leases nor starves.
- A node is the ID in its state folder (lease holders end with ``@<node ID>``); its name is for people, and one
  name belongs to one live node at a time (:meth:`PostgresStore.claim_node_name`).
- The gate's take is one transaction under ``operations``' primary key, with the day's ``spend`` row locked
  (``SELECT ... FOR UPDATE``), so two nodes never both send one operation and a cap is never passed.
- Paths are ``bytea``: the exact bytes of the name (``os.fsencode``), whatever the encoding. A file is identified
  across machines by the folder ID from the folder's marker (``watcher.markers``) and its path relative to that
  folder, plus size and mtime; not by the absolute path (mounts differ) nor the inode (SMB ``noserverino``
  numbers differ per client). Each node hands its local folder → folder ID map to :meth:`PostgresStore.use_folders`
  and gets its own absolute paths back.
- Migrations are versioned (``schema_version``) and run under an advisory lock. psycopg 3 with psycopg_pool
  (:class:`~watcher.store.postgres.pool.Pool`: connect and statement timeouts, keepalives, a deadline per call,
  broken connections replaced); no LISTEN/NOTIFY (works behind PgBouncer in transaction mode): workers poll.
  Code on the event loop reaches it through :mod:`watcher.store.aio`, never directly.
"""

from __future__ import annotations

from watcher.store.postgres.base import PgBase
from watcher.store.postgres.cache import PgCacheMixin
from watcher.store.postgres.control import PgControlMixin
from watcher.store.postgres.gate import PgGateMixin
from watcher.store.postgres.jobs import PgJobsMixin
from watcher.store.postgres.listing import PgListingMixin
from watcher.store.postgres.pool import StoreUnreachable, redact

__all__ = ["PostgresStore", "StoreUnreachable", "redact"]


class PostgresStore(PgGateMixin, PgListingMixin, PgControlMixin, PgCacheMixin, PgJobsMixin, PgBase):
    """The store in PostgreSQL: safe for many threads of many daemons on many machines at once."""

    shared = True  # several daemons use it at once: leases are not given back wholesale at start
