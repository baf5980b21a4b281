"""Prometheus text-format metrics, kept in process (no client library needed)."""

from __future__ import annotations

import threading
from collections import defaultdict

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.latency: dict[str, list[int]] = defaultdict(lambda: [0] * (len(BUCKETS) + 1))
        self.latency_sum: dict[str, float] = defaultdict(float)

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(route, method, status)] += 1
            counts = self.latency[route]
            for i, b in enumerate(BUCKETS):
                if seconds <= b:
                    counts[i] += 1
            counts[-1] += 1
            self.latency_sum[route] += seconds

    def render(self, engine) -> str:
        lines = [
            "# HELP cxr_embed_requests_total HTTP requests by route, method and status.",
            "# TYPE cxr_embed_requests_total counter",
        ]
        with self._lock:
            for (route, method, status), n in sorted(self.requests.items()):
                lines.append(f'cxr_embed_requests_total{{route="{route}",method="{method}",status="{status}"}} {n}')
            lines += ["# HELP cxr_embed_request_seconds Request latency.", "# TYPE cxr_embed_request_seconds histogram"]
            for route, counts in sorted(self.latency.items()):
                for b, c in zip(BUCKETS, counts):
                    lines.append(f'cxr_embed_request_seconds_bucket{{route="{route}",le="{b}"}} {c}')
                lines.append(f'cxr_embed_request_seconds_bucket{{route="{route}",le="+Inf"}} {counts[-1]}')
                lines.append(f'cxr_embed_request_seconds_sum{{route="{route}"}} {self.latency_sum[route]:.6f}')
                lines.append(f'cxr_embed_request_seconds_count{{route="{route}"}} {counts[-1]}')
        lines += [
            "# HELP cxr_embed_images_embedded_total Images the model has embedded.",
            "# TYPE cxr_embed_images_embedded_total counter",
            f"cxr_embed_images_embedded_total {engine.images_embedded}",
            "# HELP cxr_embed_batches_total Forward passes run by the batcher.",
            "# TYPE cxr_embed_batches_total counter",
            f"cxr_embed_batches_total {engine.batches_run}",
            "# HELP cxr_embed_queue_depth Images waiting for or in the model.",
            "# TYPE cxr_embed_queue_depth gauge",
            f"cxr_embed_queue_depth {engine.queue_depth}",
            "# HELP cxr_embed_ready 1 once the model and probes are loaded.",
            "# TYPE cxr_embed_ready gauge",
            f"cxr_embed_ready {int(engine.ready)}",
        ]
        return "\n".join(lines) + "\n"
