"""Routed experts paged under a memory budget (``--expert-cache-memory``): the checkpoint's
experts indexed and read one at a time (``source``), a cache of expert slots per rank with an
eviction policy and a loading thread (``cache``, ``policy``, ``slots``), the MoE layer's paged
path with waves and prefetch (``paged``), and the counters it reports (``stats``)."""
