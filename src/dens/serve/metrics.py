"""The node's Prometheus metrics, served as ``GET /metrics`` on the status port to a token holder
(:mod:`dens.serve.statusport`).

Each node has its own :class:`prometheus_client.CollectorRegistry` (never the process' default one), so two
nodes in one process count apart. Counters count from the node's start (Prometheus' ``rate`` and ``increase``
take a restart in their stride); the gauges (queue, outbox, drift) are read when scraped, from the state's
database and the drift windows. Labels take a few values each, all named here: no UID, address or AE title
is a label (a unit's Manufacturer and ManufacturerModelName are: :data:`dens.serve.drift.MAX_UNITS` units at
most, any further one counted as ``(other)``).
"""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from dens import labels
from dens.serve.drift import OUTSIDE, Drift
from dens.serve.state import PENDING, RECEIVING, ROW_STATUS, State

# Where a refusal happened: before the association (connection), at it, or on a message in it.
REFUSED_WHAT = ("connection", "association", "echo", "instance")
SEND_KINDS = ("dicom", "stow")
SCORED = ("assessed", "not_assessed", "failed")  # a study's outcome
PULL_POLLS = ("ok", "failed")  # a poll of --pull
PULL_INSTANCES = ("fetched", "failed", "not_mammography")  # an instance a poll found and did not hold yet
_CODE = re.compile(r"^[a-z_]{1,40}$")  # a refusal's code, as dens.serve.scp and transport word them
# Seconds from a study's first instance to its answer or its SR's delivery: the quiet time (60 s by default)
# and the scoring, or a destination down for hours.
_LATENCY = (1, 2, 5, 10, 20, 30, 45, 60, 75, 90, 120, 180, 300, 600, 1800, 3600, 4 * 3600, 24 * 3600)
_DECODE = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def refusal_code(reason: str) -> str:
    """The code of a refusal's ``code: detail`` reason, as a label (``other`` for anything else)."""
    code = reason.partition(":")[0].strip()
    return code if _CODE.match(code) else "other"


class Metrics:
    """The node's metrics; :meth:`watch` adds those read at scrape time; :meth:`render` is the page."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.instances_received = Counter(
            "dens_serve_instances_received",
            "Instances received by C-STORE and spooled (acknowledged with success; an instance sent again is not "
            "counted). A scheduled pull's count in dens_serve_pull_instances_total.",
            registry=r,
        )
        self.instances_duplicate = Counter(
            "dens_serve_instances_duplicate",
            "Instances received again after they were spooled: acknowledged, neither stored nor scored twice.",
            registry=r,
        )
        self.refused = Counter(
            "dens_serve_refused",
            "Refusals by where they happened (what: connection, before DICOM; association; echo or instance, a "
            "message in an association) and their reason code; every refusal counts, also those the refusal "
            "records and the audit log leave out (at most 8 a second per address and code are written).",
            ["what", "code"],
            registry=r,
        )
        self.instances_scored = Counter(
            "dens_serve_instances_scored",
            "Instances scored, by their preds.csv status: ok (called), skipped (not a usable presentation "
            "mammogram), error (could not be decoded).",
            ["status"],
            registry=r,
        )
        self.studies_scored = Counter(
            "dens_serve_studies_scored",
            "Studies answered, by outcome: assessed (an exam call and its SR), not_assessed (no usable image: a "
            "not-assessed SR), failed (not answered; scored again at the next start).",
            ["outcome"],
            registry=r,
        )
        self.exam_calls = Counter(
            "dens_serve_exam_calls", "Exam calls by BI-RADS density category (A-D).", ["density"], registry=r
        )
        self.sends = Counter(
            "dens_serve_sr_sends",
            "SR send attempts by destination kind (dicom: C-STORE; stow: STOW-RS) and outcome (sent; failed, "
            "to be tried again after its backoff).",
            ["kind", "outcome"],
            registry=r,
        )
        self.retries = Counter(
            "dens_serve_sr_retries",
            "SR send attempts that retried an earlier failed one, by destination kind.",
            ["kind"],
            registry=r,
        )
        self.decode_seconds = Histogram(
            "dens_serve_decode_seconds",
            "Seconds a decode worker took on one instance (reading, decoding, the canonical image).",
            buckets=_DECODE,
            registry=r,
        )
        self.model_seconds = Histogram(
            "dens_serve_model_seconds",
            "Seconds the model took per scoring round (all the usable images of the studies quiet at the time, in "
            "batches); dens_serve_model_images_total counts the images.",
            buckets=_DECODE,
            registry=r,
        )
        self.model_images = Counter("dens_serve_model_images", "Images the model scored (the usable ones).", registry=r)
        self.latency_scored = Histogram(
            "dens_serve_study_scored_seconds",
            "Seconds from a study's first instance received to its answer (scored, its SR written): the quiet "
            "time (--stable-seconds) plus the wait and the scoring.",
            buckets=_LATENCY,
            registry=r,
        )
        self.latency_sent = Histogram(
            "dens_serve_study_sent_seconds",
            "Seconds from a study's first instance received to its SR's delivery, per destination, by its kind.",
            ["kind"],
            buckets=_LATENCY,
            registry=r,
        )
        self.audit_errors = Counter(
            "dens_serve_audit_write_errors",
            "Audit log lines that could not be written (a full disk, a folder that cannot be written); the node "
            "goes on without them.",
            registry=r,
        )
        self.pull_polls = Counter(
            "dens_serve_pull_polls",
            "Polls of the PACS --pull names, by outcome: ok (searched, and what was ready fetched), failed (the PACS "
            "could not be reached, refused the credentials or the query; tried again at the next poll).",
            ["outcome"],
            registry=r,
        )
        self.pull_instances = Counter(
            "dens_serve_pull_instances",
            "Instances a poll found and the node did not hold yet, by outcome: fetched (into the spool, scored as a "
            "C-STORE's), failed (not delivered: its study is held back and tried again at the next poll), "
            "not_mammography (not a mammogram's SOP class: left on the PACS).",
            ["outcome"],
            registry=r,
        )
        self.pull_waiting: Gauge | None = None  # the gauges of a scheduled pull: :meth:`pulling`
        self.pull_last_ok: Gauge | None = None
        for status in ("ok", "skipped", "error"):
            self.instances_scored.labels(status)
        for outcome in SCORED:
            self.studies_scored.labels(outcome)
        for density in labels.CLASSES:
            self.exam_calls.labels(density)

    def destinations(self, kinds) -> None:
        """Show the send series of the destination kinds the node sends to, at 0 until they move."""
        for kind in kinds:
            self.retries.labels(kind)
            self.latency_sent.labels(kind)
            for outcome in ("sent", "failed"):
                self.sends.labels(kind, outcome)

    def pulling(self) -> None:
        """Add the gauges of a scheduled pull, and show its series at 0 until they move."""
        self.pull_waiting = Gauge(
            "dens_serve_pull_studies_waiting",
            "Studies dated today that the last poll left on the PACS because they may still grow (their instance "
            "count not yet the same at two polls --stable-seconds apart).",
            registry=self.registry,
        )
        self.pull_last_ok = Gauge(
            "dens_serve_pull_last_success_time_seconds",
            "When the last poll that succeeded started (seconds since the epoch; 0: none yet).",
            registry=self.registry,
        )
        for outcome in PULL_POLLS:
            self.pull_polls.labels(outcome)
        for outcome in PULL_INSTANCES:
            self.pull_instances.labels(outcome)

    def refusal(self, what: str, reason: str) -> None:
        """Count one refusal (``what``: one of :data:`REFUSED_WHAT`; ``reason``: ``code: detail``)."""
        self.refused.labels(what if what in REFUSED_WHAT else "other", refusal_code(reason)).inc()

    def watch(self, state: State, drift: Drift | None = None, started: float | None = None) -> None:
        """Add the gauges read at each scrape: the queue and the outbox from ``state``, the windows of
        ``drift``, and the node's start time."""
        self.registry.register(_Scraped(state, drift, started))

    def render(self) -> bytes:
        """The metrics in Prometheus' text format, without the ``_created`` series prometheus_client adds to each
        counter and histogram (when each series was made: the node's start, which a gauge says once)."""
        return generate_latest(_WithoutCreated(self.registry))


class _WithoutCreated:
    """A registry's metrics less their ``_created`` samples (each scrape builds its metric objects anew)."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry

    def collect(self):
        for family in self.registry.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


class _Scraped:
    """The gauges a scrape reads from the state and the drift windows."""

    def __init__(self, state: State, drift: Drift | None, started: float | None):
        self.state, self.drift, self.started = state, drift, started

    def describe(self) -> list:
        return []  # read at scrape time only (never when registered)

    def collect(self):
        q = self.state.read
        gauge = GaugeMetricFamily
        yield gauge(
            "dens_serve_queue_studies",
            "Studies waiting: receiving, waiting for their quiet time (--stable-seconds) or their scoring.",
            q("SELECT COUNT(*) FROM studies WHERE state = ?", [RECEIVING])[0][0],
        )
        yield gauge(
            "dens_serve_queue_instances",
            "Instances spooled and not yet scored.",
            q(f"SELECT COUNT(*) FROM instances WHERE {ROW_STATUS} IS NULL")[0][0],
        )
        yield gauge(
            "dens_serve_outbox_pending",
            "SR sends waiting for their first try or for a retry (a destination down or refusing).",
            q("SELECT COUNT(*) FROM outbox WHERE state = ?", [PENDING])[0][0],
        )
        if (started := self.started) is not None:
            yield gauge("dens_serve_start_time_seconds", "When the node started (seconds since the epoch).", started)
        if self.drift is not None:
            yield from _drift(self.drift.snapshot())


def _drift(shown: dict):
    unit = ["manufacturer", "manufacturer_model"]
    reference = shown["reference"]
    yield GaugeMetricFamily(
        "dens_serve_drift_reference_dense_share",
        "The model's dense (C or D) call share on its card's test split exams, which each unit's window is "
        "compared with (NaN: the card has no exam-level test figures, so no drift verdict).",
        float("nan") if reference is None else reference["dense_share"],
    )
    exams = GaugeMetricFamily(
        "dens_serve_drift_exams", "Exams in the unit's drift window (the last --drift-window exams).", labels=unit
    )
    shares = GaugeMetricFamily(
        "dens_serve_drift_share",
        "Share of each density call among the exams of the unit's drift window.",
        labels=[*unit, "density"],
    )
    dense = GaugeMetricFamily(
        "dens_serve_drift_dense_share", "Share of dense (C or D) calls in the unit's drift window.", labels=unit
    )
    low = GaugeMetricFamily(
        "dens_serve_drift_expected_low",
        "Lowest dense share expected (99%) for a window of this many exams like the test split's (absent: no "
        "verdict yet).",
        labels=unit,
    )
    high = GaugeMetricFamily(
        "dens_serve_drift_expected_high", "Highest dense share expected (99%) for the window.", labels=unit
    )
    warning = GaugeMetricFamily(
        "dens_serve_drift_warning",
        "1 when the unit's window's dense share is outside the expected range: look at that unit's images.",
        labels=unit,
    )
    for u in shown["units"]:
        key = [u["manufacturer"], u["manufacturer_model"]]
        exams.add_metric(key, u["exams"])
        for density, share in u["shares"].items():
            shares.add_metric([*key, density], float("nan") if share is None else share)
        dense.add_metric(key, float("nan") if u["dense_share"] is None else u["dense_share"])
        if u["expected"] is not None:
            low.add_metric(key, u["expected"][0])
            high.add_metric(key, u["expected"][1])
        warning.add_metric(key, 1.0 if u["verdict"] == OUTSIDE else 0.0)
    yield from (exams, shares, dense, low, high, warning)
