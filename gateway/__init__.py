"""The HTTP edge: buyer identity, rate limits, the waiting room, reservations, the admin API,
the waiting-room page, ``/healthz`` and ``/metrics``."""
