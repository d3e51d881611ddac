"""Dashboards as plain data (a Dashboard of Panels of PromQL queries, and its template variables), and
the PromQL they hold, built from MetricSpecs: a query can only name a metric cluster/metrics.py defines.
Each selector filters by the dashboard's variables (`$model`, `$replica`, `$run`, `$search`) on the labels
the metric has. `cluster/grafana.py` turns a Dashboard into Grafana's JSON; nothing here knows that format."""
from __future__ import annotations

from dataclasses import dataclass

from cluster.metrics import MetricSpec, series


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""  # Grafana's legend format, e.g. "{{model}} p99"


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str = "short"  # a Grafana unit id: s, percentunit, reqps, bytes, short


@dataclass(frozen=True)
class Variable:
    """A dashboard filter whose choices are the values of `label` on `metric`'s series."""

    label: str
    title: str
    metric: MetricSpec
    depends_on: tuple[str, ...] = ()  # earlier variables that narrow this one's choices


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    panels: tuple[Panel, ...]
    variables: tuple[Variable, ...] = ()

    def queries(self) -> list[Query]:
        return [query for panel in self.panels for query in panel.queries]

RATE_WINDOW = "1m"  # four scrapes at Prometheus's 15 s: rate() needs two
QUANTILES = (0.5, 0.9, 0.99)


def selector(spec: MetricSpec, suffix: str = "", variables: tuple[str, ...] = (), **matchers: str) -> str:
    """`name{label=~"$label", ...}` for each dashboard variable the metric carries, plus exact matchers."""
    terms = [f'{label}=~"${label}"' for label in variables if label in spec.tag_keys]
    terms += [f'{label}="{value}"' for label, value in matchers.items()]
    return f"{series(spec, suffix)}{{{','.join(terms)}}}"


def _aggregate(how: str, by: tuple[str, ...], inner: str) -> str:
    return f"{how} by ({', '.join(by)}) ({inner})" if by else f"{how}({inner})"


def per_second(spec: MetricSpec, by: tuple[str, ...], variables: tuple[str, ...] = (), suffix: str = "",
               **matchers: str) -> str:
    """A counter's (or a histogram's `_count`) increase per second, summed by `by`."""
    return _aggregate("sum", by, f"rate({selector(spec, suffix, variables, **matchers)}[{RATE_WINDOW}])")


def quantile(q: float, spec: MetricSpec, by: tuple[str, ...], variables: tuple[str, ...] = ()) -> str:
    """The q-quantile of a histogram over the rate window, from its buckets."""
    buckets = f"rate({selector(spec, '_bucket', variables)}[{RATE_WINDOW}])"
    return f"histogram_quantile({q}, sum by (le, {', '.join(by)}) ({buckets}))"


def gauge(spec: MetricSpec, by: tuple[str, ...], variables: tuple[str, ...] = (), how: str = "sum",
          **matchers: str) -> str:
    return _aggregate(how, by, selector(spec, "", variables, **matchers))


def ratio_of_rates(numerator: MetricSpec, denominator: MetricSpec, by: tuple[str, ...],
                   variables: tuple[str, ...] = ()) -> str:
    return f"{per_second(numerator, by, variables)} / {per_second(denominator, by, variables)}"
