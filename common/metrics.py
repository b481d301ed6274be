"""Prometheus metrics for one daemon: the status figures, plus histograms and counters.

Gauges are read from the daemon's status at scrape time, so they can never
disagree with `remusctl status`; histograms and counters are fed as events
happen. Off unless `[metrics]` names an address for this role (an address
without a host is 127.0.0.1). Served by metrics_http.MetricsServer: at most
MAX_CONNECTIONS at once, REQUEST_TIMEOUT_S for each.
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from remus.common.config import host_port
from remus.common.metrics_http import MetricsServer
from remus.common.status import Status

PAUSE_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0)
MAX_CONNECTIONS = 16     # Prometheus needs one; the rest is room for curl and retries
REQUEST_TIMEOUT_S = 5.0  # for a connection to send its request and take the reply
ACK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    """A gauge without labels, holding `value`."""
    g = GaugeMetricFamily(name, text)
    g.add_metric([], value)
    return g


class _StatusCollector:
    def __init__(self, status: Callable[[], Status]):
        self._status = status

    def collect(self):
        s = self._status()
        role = s.role.value
        state = GaugeMetricFamily("remus_state", "1 for the daemon's current state", labels=["role", "state"])
        state.add_metric([role, s.state], 1)
        yield state
        for name, key, text in (("remus_generation", "generation", "generation holding the guest"),
                                ("remus_last_committed_epoch", "last_committed_epoch",
                                 "last checkpoint the backup committed")):
            g = GaugeMetricFamily(name, text, labels=["role"])
            g.add_metric([role], getattr(s, key))
            yield g
        standby = getattr(s, "standby_guest", None)
        if standby:
            g = GaugeMetricFamily("remus_standby_guest", "1 for the state of the QEMU launched "
                                  "ahead of a failover (ready, launching, failed, gone, none, off)",
                                  labels=["state"])
            g.add_metric([standby["state"]], 1)
            yield g
        hold = getattr(s, "output_hold_s_left", None)
        if hold is not None:
            yield _gauge("remus_output_hold_seconds_left", "the backup is lost: how long the "
                         "guest's output stays held (the takeover window)", hold)
        in_flight = getattr(s, "in_flight", None)
        if in_flight is not None:
            yield _gauge("remus_checkpoints_in_flight", "checkpoints sent and not yet "
                         "acknowledged (at most [replication] pipeline)", in_flight)
        held = getattr(s, "held_output", None)
        if held:
            for key in ("held_frames", "held_bytes", "dropped_frames"):
                yield _gauge(f"remus_output_{key}", f"guest output {key.replace('_', ' ')}", held[key])
        hb = s.heartbeat
        if hb:
            up = GaugeMetricFamily("remus_heartbeat_link_up", "1 if the peer beats on the link",
                                   labels=["role", "link"])
            missed = GaugeMetricFamily("remus_heartbeat_missed_beats", "beats missed on the link now",
                                       labels=["role", "link"])
            for link in hb["links"]:
                up.add_metric([role, link["link"]], 1 if link["up"] else 0)
                missed.add_metric([role, link["link"]], link["missed"])
            yield up
            yield missed


class Metrics:
    def __init__(self, status: Callable[[], Status]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.pause = Histogram("remus_pause_seconds", "guest paused per checkpoint",
                               buckets=PAUSE_BUCKETS, registry=r)
        self.ack = Histogram("remus_ack_latency_seconds", "checkpoint sent -> acknowledged",
                             buckets=ACK_BUCKETS, registry=r)
        self.checkpoints = Counter("remus_checkpoints", "checkpoints committed", registry=r)
        self.triggers = Counter("remus_checkpoint_triggers", "checkpoints by what took them "
                                "(interval, output, disk, handover)", ["trigger"], registry=r)
        self.bytes = Counter("remus_checkpoint_bytes", "checkpoint bytes on the wire", registry=r)
        self.failovers = Counter("remus_failovers", "activations of the backup", registry=r)
        self.fencing = Counter("remus_fencing_attempts", "fencing rounds", ["result"], registry=r)
        r.register(_StatusCollector(status))
        self.server: MetricsServer | None = None

    def observe_epoch(self, stats) -> None:
        self.checkpoints.inc()
        self.triggers.labels(stats.trigger).inc()
        self.bytes.inc(stats.wire_bytes)
        if not stats.full:
            self.pause.observe(stats.pause_ms / 1000)
            self.ack.observe(stats.ack_ms / 1000)

    def serve(self, address: str) -> None:
        """Serve GET /metrics at HOST:PORT from a thread of its own; OSError if the
        address cannot be bound."""
        host, port = host_port(address, port_required=True)
        self.server = MetricsServer(lambda: generate_latest(self.registry), host, port,
                                    MAX_CONNECTIONS, REQUEST_TIMEOUT_S)
        self.server.start()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
