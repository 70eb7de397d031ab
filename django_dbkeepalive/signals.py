"""Signals sent by the connection guard.

``connection_recycled`` is sent whenever the guard closes or replaces a connection::

    from django.dispatch import receiver
    from django_dbkeepalive.signals import connection_recycled

    @receiver(connection_recycled)
    def count_recycles(sender, reason, idle, **kwargs):
        # sender: the database alias ("default"); reason: "idle", "max_age",
        # "ping_failed", "disconnected", "fork", "read_only" or "not_ready";
        # idle: seconds since last use
        statsd.incr(f"db.recycled.{sender}.{reason}")
"""

from __future__ import annotations

from django.dispatch import Signal

__all__ = ["REASONS", "connection_recycled"]

#: The values ``reason`` can take: idle past the limit, older than ``CONN_MAX_AGE``, a
#: failed ping, closed by the server or the network, inherited by a forked process, and
#: a live connection to a node that refused a statement (read-only after a failover; a
#: cluster node not ready).
REASONS = ("idle", "max_age", "ping_failed", "disconnected", "fork", "read_only", "not_ready")

connection_recycled = Signal()
