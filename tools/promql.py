"""A PromQL evaluator for exactly the subset the Grafana dashboard uses
(``docs/grafana/batchscheduler.json``), over scrapes of ``/metrics`` kept in
memory: ``tools/dashboard_preview`` draws the dashboard's panels with it, and
tests/test_grafana.py evaluates every query of the dashboard with it.

The subset, and nothing else (anything outside it raises ``UnsupportedQuery``
naming the query and the place, so the dashboard and this evaluator cannot
drift apart silently):

* a vector selector ``name{label="value", label=~"regex"}``, with an optional
  range ``[1m]`` (units ms, s, m, h, d) only as the argument of ``rate`` or
  ``increase``;
* ``rate(v[r])``, ``increase(v[r])``, ``histogram_quantile(φ, v)``,
  ``scalar(v)``;
* ``sum``, ``avg``, ``min``, ``max``, ``count``, each with an optional
  ``by (labels)`` before or after the argument;
* ``+ - * /`` between numbers and vectors; two vectors match one-to-one on
  their labels without the metric name (no ``on``/``ignoring``/``group_left``).

Prometheus' semantics, with one deliberate difference: ``rate`` and
``increase`` do not extrapolate to the edges of the range. They take the
counter's rise (resets corrected as Prometheus does) between the first and
the last sample inside the range; ``rate`` divides it by the time between
those two samples. Prometheus would stretch the rise to the whole range when
the samples nearly cover it, so over a full range of 1 s scrapes the two
differ by at most one scrape interval's worth; over a range only partly
filled (the first minute of a run) Prometheus' figure is smaller, this one
is the counter's actual rise per second.

A scrape is ``Scrape(t, series)``: the time it was taken (seconds, any clock
shared by the history) and every sample by its full name
(``batchscheduler_intents_total``, ``…_bucket``, not the family name that
``prometheus_client.parser`` reports) and sorted label pairs.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
import operator
import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]  # sorted (name, value) pairs; "__name__" for a selector's result
Vector = dict[Labels, float]
NAME = "__name__"


class Scrape(NamedTuple):
    t: float
    series: dict[str, dict[Labels, float]]  # sample name -> labels -> value


def parse_scrape(text: str, t: float) -> Scrape:
    """One ``/metrics`` response (the Prometheus text format) taken at ``t``."""
    series: dict[str, dict[Labels, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = float(sample.value)
    return Scrape(t, series)


class UnsupportedQuery(ValueError):
    """A query outside the subset this evaluator implements (the message names the query and the place)."""


class EvaluationError(ValueError):
    """A query of the subset that Prometheus would refuse at evaluation time (many-to-many matching)."""


# ------------------------------------------------------------------- syntax
@dataclasses.dataclass(frozen=True)
class Matcher:
    label: str
    op: str  # "=" or "=~"
    value: str

    def matches(self, labels: dict[str, str]) -> bool:
        got = labels.get(self.label, "")
        return got == self.value if self.op == "=" else re.fullmatch(self.value, got) is not None


@dataclasses.dataclass(frozen=True)
class Number:
    value: float


@dataclasses.dataclass(frozen=True)
class Selector:
    name: str
    matchers: tuple[Matcher, ...]
    range_s: float | None  # None: an instant vector


@dataclasses.dataclass(frozen=True)
class Call:
    func: str
    args: tuple[Node, ...]


@dataclasses.dataclass(frozen=True)
class Aggregate:
    op: str
    by: tuple[str, ...] | None  # None: everything into one group
    expr: Node


@dataclasses.dataclass(frozen=True)
class Binary:
    op: str
    lhs: Node
    rhs: Node


Node = Number | Selector | Call | Aggregate | Binary

# Static types, checked while parsing: what each node evaluates to.
SCALAR, INSTANT, RANGE = "scalar", "instant vector", "range vector"
# function -> (argument types, result type)
FUNCTIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "rate": ((RANGE,), INSTANT),
    "increase": ((RANGE,), INSTANT),
    "histogram_quantile": ((SCALAR, INSTANT), INSTANT),
    "scalar": ((INSTANT,), SCALAR),
}
AGGREGATIONS: dict[str, Callable[[list[float]], float]] = {
    "sum": math.fsum,
    "avg": lambda values: math.fsum(values) / len(values),
    "min": min,
    "max": max,
    "count": lambda values: float(len(values)),
}
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_TOKEN = re.compile(
    r"""\s*(?:
      (?P<range>\[[^\]]*\])
    | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
    | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    | (?P<op>=~|!=|!~|==|>=|<=|[-+*/%^(){},=<>@])
    )""",
    re.VERBOSE,
)


class _Token(NamedTuple):
    kind: str
    text: str
    pos: int


def _tokens(query: str) -> list[_Token]:
    tokens, pos, end = [], 0, len(query.rstrip())
    while pos < end:
        m = _TOKEN.match(query, pos)
        if m is None:
            raise UnsupportedQuery(f"{query!r}: unexpected {query[pos:].lstrip()[:1]!r} at {pos}")
        kind = m.lastgroup or ""
        tokens.append(_Token(kind, m.group(kind), m.start(kind)))
        pos = m.end()
    return tokens


def parse(query: str) -> Node:
    """The query as a tree, type-checked; UnsupportedQuery outside the subset."""
    parser = _Parser(query)
    node, kind = parser.expr()
    if parser.peek() is not None:
        parser.fail("unexpected", parser.peek())
    if kind == RANGE:
        raise UnsupportedQuery(f"{query!r}: a range vector cannot be a query's result (wrap it in rate or increase)")
    return node


class _Parser:
    def __init__(self, query: str) -> None:
        self.query = query
        self.tokens = _tokens(query)
        self.i = 0

    def fail(self, what: str, token: _Token | None = None) -> None:
        where = f"{token.text!r} at {token.pos}" if token else "the end"
        raise UnsupportedQuery(f"{self.query!r}: {what} {where}")

    def peek(self) -> _Token | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, text: str | None = None, kind: str | None = None) -> _Token:
        token = self.peek()
        if token is None or (text is not None and token.text != text) or (kind is not None and token.kind != kind):
            self.fail(f"expected {text or kind}, found", token)
        self.i += 1
        return token  # type: ignore[return-value]

    def at(self, text: str) -> bool:
        token = self.peek()
        return token is not None and token.text == text and token.kind in ("op", "ident")

    # expr := term (("+" | "-") term)* ; term := primary (("*" | "/") primary)*
    def expr(self) -> tuple[Node, str]:
        return self._binary(("+", "-"), self.term)

    def term(self) -> tuple[Node, str]:
        return self._binary(("*", "/"), self.primary)

    def _binary(self, ops: tuple[str, ...], operand: Callable[[], tuple[Node, str]]) -> tuple[Node, str]:
        lhs, lhs_kind = operand()
        while (token := self.peek()) is not None and token.kind == "op" and token.text in ops:
            self.i += 1
            after = self.peek()
            if after is not None and after.text in ("on", "ignoring", "group_left", "group_right", "bool"):
                self.fail("vector matching modifiers are not supported:", after)
            rhs, rhs_kind = operand()
            for kind in (lhs_kind, rhs_kind):
                if kind == RANGE:
                    self.fail(f"a range vector cannot be an operand of {token.text!r}", token)
            lhs, lhs_kind = Binary(token.text, lhs, rhs), SCALAR if lhs_kind == rhs_kind == SCALAR else INSTANT
        token = self.peek()
        if token is not None and token.kind == "op" and token.text not in ("+", "-", "*", "/", ")", ","):
            self.fail("unsupported operator", token)
        return lhs, lhs_kind

    def primary(self) -> tuple[Node, str]:
        token = self.peek()
        if token is None:
            self.fail("expected an expression at")
        assert token is not None
        if token.kind == "number":
            self.i += 1
            return Number(float(token.text)), SCALAR
        if token.text == "(" and token.kind == "op":
            self.i += 1
            inner = self.expr()
            self.take(")")
            return inner
        if token.kind != "ident":
            self.fail("unsupported", token)
        if token.text in AGGREGATIONS:
            return self.aggregation(), INSTANT
        nxt = self.tokens[self.i + 1] if self.i + 1 < len(self.tokens) else None
        if nxt is not None and nxt.text == "(":
            return self.call()
        return self.selector()

    def labels(self) -> tuple[str, ...]:
        self.take("(")
        names = []
        while not self.at(")"):
            names.append(self.take(kind="ident").text)
            if not self.at(")"):
                self.take(",")
        self.take(")")
        return tuple(names)

    def aggregation(self) -> Aggregate:
        op = self.take(kind="ident").text
        by = None
        if self.at("without"):
            self.fail("'without' is not supported:", self.peek())
        if self.at("by"):
            self.i += 1
            by = self.labels()
        self.take("(")
        arg, kind = self.expr()
        if kind != INSTANT:
            self.fail(f"{op} needs an instant vector, not {_a(kind)}, before", self.peek())
        self.take(")")
        if self.at("by") or self.at("without"):
            if by is not None or self.at("without"):
                self.fail("a second grouping clause:", self.peek())
            self.i += 1
            by = self.labels()
        return Aggregate(op, by, arg)

    def call(self) -> tuple[Node, str]:
        name = self.take(kind="ident")
        if name.text not in FUNCTIONS:
            self.fail("unsupported function", name)
        wanted, result = FUNCTIONS[name.text]
        self.take("(")
        args = []
        for n, kind in enumerate(wanted):
            if n:
                self.take(",")
            arg, got = self.expr()
            if got != kind:
                self.fail(f"{name.text} argument {n + 1} must be {_a(kind)}, not {_a(got)}, before", self.peek())
            args.append(arg)
        self.take(")")
        return Call(name.text, tuple(args)), result

    def selector(self) -> tuple[Node, str]:
        name = self.take(kind="ident").text
        matchers = []
        if self.at("{"):
            self.i += 1
            while not self.at("}"):
                label = self.take(kind="ident").text
                op = self.take(kind="op")
                if op.text not in ("=", "=~"):
                    self.fail("unsupported label matcher", op)
                value = self.take(kind="string").text
                matchers.append(Matcher(label, op.text, _unquote(value)))
                if not self.at("}"):
                    self.take(",")
            self.take("}")
        range_s = None
        token = self.peek()
        if token is not None and token.kind == "range":
            self.i += 1
            range_s = _duration(token, self.query)
        token = self.peek()
        if token is not None and (token.text in ("offset", "@") or token.kind == "range"):
            self.fail("unsupported", token)
        return Selector(name, tuple(matchers), range_s), INSTANT if range_s is None else RANGE


def _a(kind: str) -> str:
    return f"an {kind}" if kind == INSTANT else f"a {kind}"


def _unquote(text: str) -> str:
    body = text[1:-1]
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), body)


def _duration(token: _Token, query: str) -> float:
    text = token.text[1:-1].strip()
    parts = re.findall(r"(\d+)(ms|s|m|h|d)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise UnsupportedQuery(f"{query!r}: not a range like [1m] or [30s]: {token.text!r} at {token.pos}")
    seconds = sum(int(n) * _DURATION_UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise UnsupportedQuery(f"{query!r}: an empty range {token.text!r} at {token.pos}")
    return seconds


def metric_names(node: Node) -> set[str]:
    """Every sample name a query selects (``…_total``, ``…_bucket``, …)."""
    if isinstance(node, Selector):
        return {node.name}
    if isinstance(node, Call):
        return set().union(*(metric_names(a) for a in node.args))
    if isinstance(node, Aggregate):
        return metric_names(node.expr)
    if isinstance(node, Binary):
        return metric_names(node.lhs) | metric_names(node.rhs)
    return set()


# --------------------------------------------------------------- evaluation
def evaluate(query: str | Node, history: Sequence[Scrape], at: int = -1) -> Vector | float:
    """The query's value at scrape ``history[at]``, from that scrape and the
    ones before it: a float for a scalar query, else labels -> value."""
    node = parse(query) if isinstance(query, str) else query
    if not history:
        raise EvaluationError("no scrape to evaluate against")
    upto = range(len(history))[at] + 1
    return _Evaluation(history[:upto]).eval(node)


class _Evaluation:
    def __init__(self, history: Sequence[Scrape]) -> None:
        self.history = history
        self.now = history[-1]

    def eval(self, node: Node) -> Vector | float:
        if isinstance(node, Number):
            return node.value
        if isinstance(node, Selector):
            return self.instant(node)
        if isinstance(node, Call):
            return self.call(node)
        if isinstance(node, Aggregate):
            return self.aggregate(node)
        return self.binary(node)

    def instant(self, sel: Selector) -> Vector:
        # Only the latest scrape: a series it lacks is stale, as in Prometheus.
        return {
            ((NAME, sel.name), *labels): v
            for labels, v in self.now.series.get(sel.name, {}).items()
            if all(m.matches(dict(labels)) for m in sel.matchers)
        }

    def points(self, sel: Selector) -> dict[Labels, list[tuple[float, float]]]:
        """Every matching series' samples in (now - range, now]."""
        assert sel.range_s is not None
        start = self.now.t - sel.range_s
        found: dict[Labels, list[tuple[float, float]]] = {}
        for scrape in self.history:
            if scrape.t <= start:
                continue
            for labels, v in scrape.series.get(sel.name, {}).items():
                if all(m.matches(dict(labels)) for m in sel.matchers):
                    found.setdefault(labels, []).append((scrape.t, v))
        return found

    def call(self, node: Call) -> Vector | float:
        if node.func in ("rate", "increase"):
            (sel,) = node.args
            assert isinstance(sel, Selector)
            out = {}
            for labels, pts in self.points(sel).items():
                if len(pts) < 2 or pts[-1][0] <= pts[0][0]:
                    continue  # a rise needs two samples, as in Prometheus
                rise = counter_rise([v for _, v in pts])
                out[labels] = rise / (pts[-1][0] - pts[0][0]) if node.func == "rate" else rise
            return out
        if node.func == "histogram_quantile":
            q = self.eval(node.args[0])
            vector = self.eval(node.args[1])
            assert isinstance(q, float) and isinstance(vector, dict)
            groups: dict[Labels, list[tuple[float, float]]] = {}
            for labels, v in vector.items():
                named = dict(labels)
                if "le" not in named:
                    continue  # not a bucket: Prometheus ignores it too
                key = tuple((k, val) for k, val in labels if k not in ("le", NAME))
                groups.setdefault(key, []).append((float(named["le"]), v))
            return {key: bucket_quantile(q, buckets) for key, buckets in groups.items()}
        (arg,) = node.args  # scalar()
        vector = self.eval(arg)
        assert isinstance(vector, dict)
        return next(iter(vector.values())) if len(vector) == 1 else math.nan

    def aggregate(self, node: Aggregate) -> Vector:
        vector = self.eval(node.expr)
        assert isinstance(vector, dict)
        groups: dict[Labels, list[float]] = {}
        by = node.by or ()
        for labels, v in vector.items():
            named = dict(labels)
            key = tuple(sorted((k, named[k]) for k in by if named.get(k, "") != ""))
            groups.setdefault(key, []).append(v)
        return {key: AGGREGATIONS[node.op](values) for key, values in groups.items()}

    def binary(self, node: Binary) -> Vector | float:
        fn = _ARITHMETIC[node.op]
        lhs, rhs = self.eval(node.lhs), self.eval(node.rhs)
        if isinstance(lhs, float) and isinstance(rhs, float):
            return fn(lhs, rhs)
        if isinstance(rhs, float):
            assert isinstance(lhs, dict)
            return {_unnamed(k): fn(v, rhs) for k, v in lhs.items()}
        if isinstance(lhs, float):
            return {_unnamed(k): fn(lhs, v) for k, v in rhs.items()}
        left, right = _one_per_signature(lhs, node), _one_per_signature(rhs, node)
        return {k: fn(v, right[k]) for k, v in left.items() if k in right}


def _unnamed(labels: Labels) -> Labels:
    return tuple(pair for pair in labels if pair[0] != NAME)


def _one_per_signature(vector: Vector, node: Binary) -> Vector:
    out: Vector = {}
    for labels, v in vector.items():
        key = _unnamed(labels)
        if key in out:
            raise EvaluationError(
                f"{node.op!r}: two series with the labels {dict(key)} on one side (many-to-many matching)"
            )
        out[key] = v
    return out


def _divide(a: float, b: float) -> float:
    """IEEE division, as Prometheus does: x/0 is ±Inf, 0/0 is NaN."""
    if b == 0:
        return math.nan if a == 0 or math.isnan(a) else math.copysign(math.inf, a) * math.copysign(1.0, b)
    return a / b


_ARITHMETIC: dict[str, Callable[[float, float], float]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": _divide,
}


def counter_rise(values: Sequence[float]) -> float:
    """How much a counter rose over its samples: a drop is a reset to 0, so
    the value before the drop is added back (Prometheus' correction)."""
    rise = values[-1] - values[0]
    for before, after in itertools.pairwise(values):
        if after < before:
            rise += before
    return rise


def bucket_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """The φ-quantile from cumulative ``(upper bound, count)`` buckets, as
    Prometheus' ``histogram_quantile``: linear inside the bucket the rank
    falls in, the largest finite bound when it falls in +Inf, NaN without
    a +Inf bucket or without observations."""
    if math.isnan(q):
        return math.nan
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    buckets = sorted(buckets)
    if len(buckets) < 2 or buckets[-1][0] != math.inf:
        return math.nan
    bounds = [b for b, _ in buckets]
    counts = list(itertools.accumulate((c for _, c in buckets), max))  # rates may dip: keep them monotonic
    total = counts[-1]
    if not total > 0:
        return math.nan
    rank = q * total
    b = bisect.bisect_left(counts, rank, hi=len(counts) - 1)
    if b == len(counts) - 1:
        return bounds[-2]
    if b == 0 and bounds[0] <= 0:
        return bounds[0]
    start = bounds[b - 1] if b > 0 else 0.0
    below = counts[b - 1] if b > 0 else 0.0
    return start + (bounds[b] - start) * _divide(rank - below, counts[b] - below)
