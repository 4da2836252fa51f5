"""The node's web side: a read-only dashboard, ``/metrics``, ``/healthz`` and ``/readyz``.

Served by ``cadnode serve`` (uvicorn in a thread) when ``CADNODE_HTTP_PORT`` is not 0, bound to
``CADNODE_HTTP_HOST``; ``CADNODE_HTTP_TOKEN`` guards every path but ``/healthz``. It only reads
the job database (cadnode.jobs.admin) and the result files; the worker, the outbox and the
listener's callbacks feed its live metrics through optional hooks.
"""
