"""Request metrics in a worker's shared-memory cell: the worker's `Recorder` writes, the master reads.

Layout (METRICS_VERSION 2). Offsets are u64 words from `layout.METRICS_BASE` inside one cell
(`layout.WORDS - METRICS_BASE` = 960 words available, 852 used):

    offset  words      what
    0       1          METRICS_VERSION, written by the Recorder when it starts (0: nothing recorded yet)
    1       18 x 2     requests answered, by METHODS x OUTCOMES: word 1 + method * 2 + outcome,
                       outcome 0 = "error" (answered with a JSON-RPC error), 1 = "ok"
    37      3          (reserved)
    40      18 x 16    request duration histogram per method, HIST_WORDS words each (see below); for
                       tools/call only the calls that named no known tool (version 2, see below)
    328     32 x 16    tool-call duration histogram per tool slot: slots 0..30 are the worker's first 31
                       distinct tool names in the order of its `tool_names` list, slot 31 is "other"
    840     12         cluster event propagation histogram, PROPAGATION_WORDS words
    852     108        (free)

A histogram is its bucket counts, NOT cumulative, one word per bound plus one for +Inf, followed by the
sum of observations in integer nanoseconds. The count is not stored: it is the sum of the buckets, so
an observation costs one store less and a reader can never see a count that disagrees with +Inf.

Version 2 records a tool call's duration once, in its tool's histogram, and a reader adds every tool
slot's histogram to tools/call's own: two stores fewer on the hottest path. A sum of words that only
grow only grows, so the derived histogram is as monotonic as a stored one. Version 1 (tools/call
stored both ways) is still read, for a master that outlives its old workers across an upgrade.

Process counters folded with the metrics (COUNTER_FIELDS) and gauges (`Gauges`) live in the `F_*`
words below METRICS_BASE (see shared/layout.py); the Recorder writes those it owns.

Which tool name a slot stands for is not in shared memory: the worker sends its tool names to the
master once at start, in its `Hello` control message (shared/control.py), and both sides map names to
slots with `tool_slots`.

Concurrency: every word has one writer, the event-loop thread of the worker owning the lane. `+=` on a
word is a read-modify-write, so a tool thread must never call the Recorder (it would lose increments);
record from the loop once the tool's future is done. Stores are aligned u64, so the master never sees
a torn word, though it may see one observation's bucket before its sum; both only grow.

A lane's counters restart at zero with each process; the master keeps them monotonic by folding
(`snapshot` then `Totals.__add__`) a reaped process's lane into retired totals before reusing it.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import NamedTuple

from mcpherd.shared import layout

METRICS_VERSION = 2
READABLE_VERSIONS = (1, 2)  # a master after an upgrade (SIGUSR2) still reads the old workers' lanes
METHODS = (
    "initialize", "ping", "tools/list", "tools/call", "resources/list", "resources/templates/list",
    "resources/read", "resources/subscribe", "resources/unsubscribe", "prompts/list", "prompts/get",
    "completion/complete", "logging/setLevel", "server/discover", "subscriptions/listen",
    "notifications",  # any client notification
    "responses",  # client responses to requests the server sent (sampling, elicitation, roots)
    "other",  # any other method name, so that clients cannot create series
)
OUTCOMES = ("error", "ok")  # index = int(ok)
OTHER_METHOD = METHODS.index("other")
TOOLS_CALL = METHODS.index("tools/call")
NOTIFICATIONS = METHODS.index("notifications")
TOOL_SLOTS = 32
OTHER_TOOL = "other"  # the label of slot TOOL_SLOTS - 1 and of tools the master has no name for

# Finite upper bounds in seconds (Prometheus `le`); +Inf is the implicit last bucket.
REQUEST_BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
REQUEST_BOUNDS_NS = tuple(round(bound * 1e9) for bound in REQUEST_BOUNDS)
_FIRST_BOUND_NS = REQUEST_BOUNDS_NS[0]
PROPAGATION_BOUNDS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)
HIST_WORDS = len(REQUEST_BOUNDS) + 2  # buckets incl. +Inf, then sum_ns
PROPAGATION_WORDS = len(PROPAGATION_BOUNDS) + 2

M_VERSION = 0
M_REQUESTS = 1
M_REQUEST_HIST = 40
M_TOOL_HIST = M_REQUEST_HIST + len(METHODS) * HIST_WORDS
M_PROPAGATION = M_TOOL_HIST + TOOL_SLOTS * HIST_WORDS
METRICS_WORDS = M_PROPAGATION + PROPAGATION_WORDS

# Counters kept in the process fields, folded like the metrics. Name -> F_* word.
COUNTER_FIELDS = {
    "http_requests": layout.F_REQUESTS,
    "errors": layout.F_ERRORS,
    "bytes_in": layout.F_BYTES_IN,
    "bytes_out": layout.F_BYTES_OUT,
    "cache_hits": layout.F_CACHE_HITS,
    "cache_misses": layout.F_CACHE_MISSES,
    "cache_evictions": layout.F_CACHE_EVICTIONS,
    "busy_ns": layout.F_BUSY_NS,
}


def _check_layout() -> None:
    """The docstring's table is the format: fail at import if the constants drifted from it."""
    if M_REQUESTS + len(METHODS) * len(OUTCOMES) > M_REQUEST_HIST:
        raise AssertionError("request counters overlap the request histograms")
    if (M_TOOL_HIST, M_PROPAGATION, METRICS_WORDS) != (328, 840, 852):
        raise AssertionError("metrics layout differs from the table in the module docstring")
    if METRICS_WORDS > layout.WORDS - layout.METRICS_BASE:
        raise AssertionError("metrics do not fit in a shared-memory cell")


_check_layout()


def method_index(method: str) -> int:
    """The METHODS index counting a JSON-RPC method name; unknown names count as "other"."""
    if method.startswith("notifications/"):
        return NOTIFICATIONS
    try:
        return METHODS.index(method)
    except ValueError:
        return OTHER_METHOD


def tool_slots(names: Sequence[str]) -> list[str]:
    """The names that get their own histogram slot, in slot order: the first 31 distinct ones."""
    return list(dict.fromkeys(names))[: TOOL_SLOTS - 1]


class Recorder:
    """Worker side: each call is a few aligned word increments. Event-loop thread only (see above)."""

    __slots__ = ("_words", "_methods", "_tools", "_other_tool", "_tool_calls", "_other_call", "_propagation", "_f")

    def __init__(self, cell: layout.Cell, tool_names: Sequence[str]) -> None:
        words, base = cell.words, cell.base
        metrics = base + layout.METRICS_BASE
        self._words = words
        self._f = base  # F_* words are at base + F_*
        # Absolute word indices, computed once so that a call is a dict lookup and some adds.
        self._methods = {name: (metrics + M_REQUESTS + i * len(OUTCOMES), metrics + M_REQUEST_HIST + i * HIST_WORDS)
                         for i, name in enumerate(METHODS)}
        self._tools = {name: metrics + M_TOOL_HIST + i * HIST_WORDS for i, name in enumerate(tool_slots(tool_names))}
        self._other_tool = metrics + M_TOOL_HIST + (TOOL_SLOTS - 1) * HIST_WORDS
        # A tool call's (request counter, histogram) by tool name: `answered` looks up one pair.
        calls = self._methods["tools/call"][0]
        self._tool_calls = {name: (calls, histogram) for name, histogram in self._tools.items()}
        self._other_call = (calls, self._other_tool)
        self._propagation = metrics + M_PROPAGATION
        words[metrics + M_VERSION] = METRICS_VERSION

    def request(self, method: str, ok: bool, seconds: float) -> None:
        """One JSON-RPC message answered (or accepted, for notifications and responses) that no Call counted."""
        self.answered(method, ok, int(seconds * 1e9) if seconds > 0.0 else 0, "", waited=False)

    def answered(self, method: str, ok: bool, ns: int, tool: str, waited: bool) -> None:
        """A Call's final message, `ns` nanoseconds after it began, in one call (the hot path): the
        request counter; the duration into the tool's histogram when `tool` names one (it counts for
        tools/call too, see the layout), else the method's; `leave` when the call was `enter`ed."""
        if tool:
            counter, histogram = self._tool_calls.get(tool, self._other_call)
        else:
            indices = self._methods.get(method)
            if indices is None:
                indices = self._methods[METHODS[method_index(method)]]
            counter, histogram = indices
        words = self._words
        words[counter + ok] += 1
        # Most answers take less than the first bound: one comparison instead of a search.
        words[histogram + (0 if ns <= _FIRST_BOUND_NS else bisect_left(REQUEST_BOUNDS_NS, ns))] += 1
        words[histogram + HIST_WORDS - 1] += ns
        if not ok:
            words[self._f + layout.F_ERRORS] += 1
        if waited:
            self.leave()

    def propagation(self, seconds: float) -> None:
        """A cluster event applied here, `seconds` after the master published it."""
        histogram = self._propagation
        words = self._words
        words[histogram + bisect_left(PROPAGATION_BOUNDS, seconds)] += 1
        words[histogram + PROPAGATION_WORDS - 1] += int(seconds * 1e9) if seconds > 0.0 else 0

    def event_applied(self, sequence: int) -> None:
        self._words[self._f + layout.F_EVENTS_APPLIED] = sequence

    def enter(self) -> None:
        """A request starts being handled (in-flight gauge); pair with `leave`."""
        self._words[self._f + layout.F_INFLIGHT] += 1

    def leave(self) -> None:
        index = self._f + layout.F_INFLIGHT
        if self._words[index]:  # an unpaired leave must not wrap the u64 (or raise on the hot path)
            self._words[index] -= 1

    def gauges(self, connections: int, streams: int) -> None:
        """Sampled by the heartbeat: cheaper than counting every open and close."""
        self._words[self._f + layout.F_CONNECTIONS] = connections
        self._words[self._f + layout.F_STREAMS] = streams

    def http_error(self) -> None:
        """An HTTP error status answered without any JSON-RPC method being counted."""
        self._words[self._f + layout.F_ERRORS] += 1

    def transferred(self, received: int, sent: int) -> None:
        words, base = self._words, self._f
        words[base + layout.F_BYTES_IN] += received
        words[base + layout.F_BYTES_OUT] += sent

    def busy(self, ns: int) -> None:
        self._words[self._f + layout.F_BUSY_NS] += ns

    def cache(self, hits: int = 0, misses: int = 0, evictions: int = 0) -> None:
        words, base = self._words, self._f
        words[base + layout.F_CACHE_HITS] += hits
        words[base + layout.F_CACHE_MISSES] += misses
        words[base + layout.F_CACHE_EVICTIONS] += evictions


# -- the master's side ----------------------------------------------------------------------------


@dataclass(slots=True)
class Histogram:
    buckets: list[int]  # non-cumulative; the last one is +Inf
    sum_ns: int = 0

    @classmethod
    def zero(cls, bounds: Sequence[float]) -> Histogram:
        return cls([0] * (len(bounds) + 1))

    @property
    def count(self) -> int:
        return sum(self.buckets)

    def cumulative(self) -> list[int]:
        return list(accumulate(self.buckets))

    def __add__(self, other: Histogram) -> Histogram:
        return Histogram([a + b for a, b in zip(self.buckets, other.buckets, strict=True)], self.sum_ns + other.sum_ns)


def _zero_durations() -> list[Histogram]:
    return [Histogram.zero(REQUEST_BOUNDS) for _ in METHODS]


@dataclass(slots=True)
class Totals:
    """Counters of one lane, or sums over lanes (retired + live). Tool histograms are keyed by name,
    so that folding lanes whose processes had other tool lists keeps each tool's series."""

    requests: list[int] = field(default_factory=lambda: [0] * (len(METHODS) * len(OUTCOMES)))
    durations: list[Histogram] = field(default_factory=_zero_durations)  # per METHODS
    tools: dict[str, Histogram] = field(default_factory=dict)
    propagation: Histogram = field(default_factory=lambda: Histogram.zero(PROPAGATION_BOUNDS))
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTER_FIELDS, 0))

    def requests_of(self, method: str, outcome: str) -> int:
        return self.requests[METHODS.index(method) * len(OUTCOMES) + OUTCOMES.index(outcome)]

    def __add__(self, other: Totals) -> Totals:
        tools = dict(self.tools)
        for name, histogram in other.tools.items():
            mine = tools.get(name)
            tools[name] = histogram if mine is None else mine + histogram
        return Totals(
            [a + b for a, b in zip(self.requests, other.requests, strict=True)],
            [a + b for a, b in zip(self.durations, other.durations, strict=True)],
            tools,
            self.propagation + other.propagation,
            {name: value + other.counters[name] for name, value in self.counters.items()},
        )


def _histogram(values: list[int], offset: int, words: int) -> Histogram:
    return Histogram(values[offset:offset + words - 1], values[offset + words - 1])


def snapshot(cell: layout.Cell, tool_names: Sequence[str] = (), unnamed_tool: str | None = None) -> Totals:
    """A lane's counters now. `tool_names` (slot order, as the worker sent them) label the tool slots;
    slots beyond them go to `unnamed_tool`, or are left out if None and they were never used."""
    values = cell.words[cell.base:cell.base + layout.WORDS].tolist()
    counters = {name: values[index] for name, index in COUNTER_FIELDS.items()}
    base = layout.METRICS_BASE
    version = values[base + M_VERSION]
    if version not in READABLE_VERSIONS:  # 0: no Recorder yet; else a layout we cannot read
        return Totals(counters=counters)
    requests = values[base + M_REQUESTS:base + M_REQUESTS + len(METHODS) * len(OUTCOMES)]
    durations = [_histogram(values, base + M_REQUEST_HIST + i * HIST_WORDS, HIST_WORDS) for i in range(len(METHODS))]
    if version >= 2:  # a tool call's duration is only in its tool's histogram
        for index in range(TOOL_SLOTS):
            durations[TOOLS_CALL] += _histogram(values, base + M_TOOL_HIST + index * HIST_WORDS, HIST_WORDS)
    tools: dict[str, Histogram] = {}
    for index in range(TOOL_SLOTS):
        histogram = _histogram(values, base + M_TOOL_HIST + index * HIST_WORDS, HIST_WORDS)
        name = _tool_label(index, tool_names, unnamed_tool)
        if name is not None and (index < len(tool_names) or histogram.count):
            previous = tools.get(name)
            tools[name] = histogram if previous is None else previous + histogram
    propagation = _histogram(values, base + M_PROPAGATION, PROPAGATION_WORDS)
    return Totals(requests, durations, tools, propagation, counters)


def _tool_label(index: int, tool_names: Sequence[str], unnamed_tool: str | None) -> str | None:
    if index < len(tool_names) and index < TOOL_SLOTS - 1:
        return tool_names[index]
    return OTHER_TOOL if index == TOOL_SLOTS - 1 else unnamed_tool


class Gauges(NamedTuple):
    """A live lane's instantaneous values (never folded: they end with the process)."""

    inflight: int
    connections: int
    streams: int
    loop_lag_s: float
    heartbeat_ns: int  # CLOCK_MONOTONIC of the last loop turn that wrote it (0: none yet)


def gauges(cell: layout.Cell) -> Gauges:
    return Gauges(cell.get(layout.F_INFLIGHT), cell.get(layout.F_CONNECTIONS), cell.get(layout.F_STREAMS),
                  cell.get(layout.F_LOOP_LAG_US) / 1e6, cell.get(layout.F_HEARTBEAT))
