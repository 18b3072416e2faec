"""Prometheus metrics, named after vLLM's (``dist_engine:`` prefix), served at ``/metrics``.

Gauges and totals are read from the engine's stats snapshot at scrape time (a collector, so
nothing can drift); latency histograms are observed by the servicer when a request finishes.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer

from dist_engine.engine.outputs import RequestMetrics

P = "dist_engine:"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

_GAUGES = (("num_requests_running", "num_seqs_running", "Sequences in the running batch."),
           ("num_requests_waiting", "num_seqs_waiting", "Sequences waiting to be scheduled."),
           ("kv_cache_usage_perc", "kv_cache_usage", "Fraction of KV blocks in use (0-1)."))
_COUNTERS = (("prefix_cache_queries", "prefix_cache_query_tokens", "Prompt tokens looked up in the prefix cache."),
             ("prefix_cache_hits", "prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache."),
             ("num_preemptions", "num_preemptions", "Sequences preempted for lack of KV blocks."),
             ("prompt_tokens", "prompt_tokens_computed", "Prompt tokens prefilled."),
             ("generation_tokens", "generation_tokens", "Tokens generated."),
             ("request_success", "num_finished", "Requests finished (stop or length)."),
             ("request_aborted", "num_aborted", "Requests aborted (cancel, disconnect, deadline)."))

_SPEC_COUNTERS = (("spec_decode_num_drafts", "num_steps", "Verification steps that carried drafts."),
                  ("spec_decode_num_draft_tokens", "num_draft_tokens", "Draft tokens verified."),
                  ("spec_decode_num_accepted_tokens", "num_accepted_tokens", "Draft tokens accepted."),
                  ("spec_decode_num_seqs_disabled", "num_seqs_without_speculation",
                   "Sequences admitted under load, run without speculation."))


_EXPERT_COUNTERS = (("expert_cache_hits", "hits", "Routed-expert lookups served by the expert cache."),
                    ("expert_cache_misses", "misses", "Routed-expert lookups that had to load the expert."),
                    ("expert_cache_prefetches", "prefetches", "Experts loaded ahead by the next layer's router."),
                    ("expert_cache_prefetch_hits", "prefetch_hits", "Prefetched experts a layer then used."),
                    ("expert_cache_evictions", "evictions", "Experts evicted from the expert cache."),
                    ("expert_cache_bytes_paged", "bytes_read", "Bytes of routed experts paged in."))
_EXPERT_GAUGES = (("expert_cache_hit_rate", "hit_rate", "Expert cache hits / lookups since start-up (0-1)."),
                  ("expert_cache_bytes_paged_per_token", "bytes_per_token", "Expert bytes paged in per token."),
                  ("expert_cache_resident_bytes", "resident_bytes", "Bytes of routed experts resident, all ranks."),
                  ("expert_cache_budget_bytes", "budget_bytes", "Expert cache budget per rank."),
                  ("expert_cache_worker_rss_anon_bytes", "rss_anon_bytes", "Largest worker's heap (RssAnon)."),
                  ("expert_cache_worker_rss_file_bytes", "rss_file_bytes", "Largest worker's mapped file pages (RssFile)."))


class _EngineCollector:
    def __init__(self, stats) -> None:
        self.stats = stats

    def collect(self):
        s = self.stats()
        for name, key, doc in _GAUGES:
            yield GaugeMetricFamily(P + name, doc, value=s[key])
        for name, key, doc in _COUNTERS:
            yield CounterMetricFamily(P + name, doc, value=s[key])
        spec = s.get("spec_decode")
        if spec:
            for name, key, doc in _SPEC_COUNTERS:
                yield CounterMetricFamily(P + name, doc, value=spec[key])
            per_pos = CounterMetricFamily(P + "spec_decode_num_accepted_tokens_per_pos",
                                          "Accepted drafts at each draft position.",
                                          labels=["position"])
            for j, accepted in enumerate(spec["accepted_at"]):
                per_pos.add_metric([str(j)], accepted)
            yield per_pos
        experts = s.get("expert_cache")
        if experts:
            for name, key, doc in _EXPERT_COUNTERS:
                yield CounterMetricFamily(P + name, doc, value=experts[key])
            for name, key, doc in _EXPERT_GAUGES:
                yield GaugeMetricFamily(P + name, doc, value=experts[key])


class ServerMetrics:
    def __init__(self, stats) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats))
        kw = dict(registry=self.registry, buckets=_LATENCY_BUCKETS)
        self.ttft = Histogram(P + "time_to_first_token_seconds", "Arrival to first token.", **kw)
        self.itl = Histogram(P + "inter_token_latency_seconds", "Time between output tokens.", **kw)
        self.queue = Histogram(P + "request_queue_time_seconds", "Arrival to first scheduled.", **kw)
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "Arrival to finish.", **kw)
        self.rejected = Counter(P + "request_rejected", "Requests refused before running, by "
                                "reason (invalid_argument, resource_exhausted, unauthenticated).",
                                ["reason"], registry=self.registry)

    def observe(self, m: RequestMetrics) -> None:
        if m.time_to_first_token is not None:
            self.ttft.observe(m.time_to_first_token)
        for gap in m.inter_token_latencies:
            self.itl.observe(gap)
        if m.queue_time is not None:
            self.queue.observe(m.queue_time)
        if m.finished_time is not None:
            self.e2e.observe(m.finished_time - m.arrival_time)

    def serve(self, host: str, port: int, authorize=None) -> None:
        """``/metrics`` on its own port, in a thread; ``authorize(header) -> bool`` (for
        ``--metrics-auth``) checks the ``Authorization`` header of every scrape."""
        app = make_wsgi_app(self.registry)

        def guarded(environ, start_response):
            if authorize is not None and not authorize(environ.get("HTTP_AUTHORIZATION")):
                start_response("401 Unauthorized", [("WWW-Authenticate", "Bearer"),
                                                    ("Content-Type", "text/plain")])
                return [b"missing or wrong bearer token\n"]
            return app(environ, start_response)

        server = make_server(host, port, guarded, ThreadingWSGIServer, handler_class=_Quiet)
        threading.Thread(target=server.serve_forever, daemon=True, name="metrics").start()


class _Quiet(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:  # one line per scrape would flood the log
        pass
