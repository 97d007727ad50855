"""The alert rules, the dashboard and the metrics table agree with the metrics the worker
exports: a metric renamed or a label dropped in streams/metrics.py fails here, not silently
in production as an alert that can never fire."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry

from vql.streams.metrics import WorkerMetrics

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "vql-worker-dashboard.json"
OPERATIONS = ROOT / "docs" / "operations.md"

# Labels Prometheus adds to every scraped series, and a histogram bucket's bound.
TARGET_LABELS = {"instance", "job", "le"}
SAMPLE_SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",),
                   "histogram": ("_bucket", "_count", "_sum", "_created")}


def exported() -> dict[str, set[str]]:
    """Every sample name the worker's own metrics export, with the labels it carries."""
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry, groups=2, codes=4)
    labels = {m._name: set(m._labelnames) for m in vars(metrics).values() if hasattr(m, "_labelnames")}
    names: dict[str, set[str]] = {}
    for family in registry.collect():
        for suffix in SAMPLE_SUFFIXES[family.type]:
            names[family.name + suffix] = labels[family.name] | ({"le"} if suffix == "_bucket" else set())
    return names


def rules() -> list[dict]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def expressions() -> list[str]:
    """Every PromQL expression of the alert rules and the dashboard's panels."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [rule["expr"] for rule in rules()] + [t["expr"] for p in panels for t in p["targets"]]


def test_the_rules_parse_and_each_says_what_and_how_urgent():
    found = rules()
    assert found
    for rule in found:
        assert {"alert", "expr", "for", "labels", "annotations"} <= set(rule), rule
        assert rule["labels"]["severity"] in ("page", "ticket") and rule["annotations"]["summary"], rule


def test_every_metric_an_expression_reads_is_one_the_worker_exports():
    names = exported()
    for expr in expressions():
        used = set(re.findall(r"\bvql_\w+", expr))
        assert used <= set(names), f"{expr!r} reads {sorted(used - set(names))}, which no worker exports"


def test_every_label_an_expression_names_is_on_a_metric_it_reads():
    names = exported()
    for expr in expressions():
        labels = set().union(*(names[n] for n in re.findall(r"\bvql_\w+", expr) if n in names), TARGET_LABELS)
        named = {label for group in re.findall(r"\b(?:by|on|without|ignoring)\s*\(([^)]*)\)", expr)
                 for label in re.split(r"\s*,\s*", group.strip()) if label}
        named |= set(re.findall(r"[{,]\s*(\w+)\s*=~?", expr))
        assert named <= labels, f"{expr!r} names labels {sorted(named - labels)} its metrics lack"


def test_a_worker_that_stopped_consuming_is_alerted_on():
    stalled = [rule for rule in rules() if rule["alert"] == "VqlWorkerStalled"]
    assert len(stalled) == 1
    assert {"vql_consumer_lag_records", "vql_last_batch_timestamp_seconds"} <= set(
        re.findall(r"\bvql_\w+", stalled[0]["expr"]))


def test_the_operations_guide_lists_every_metric_and_alert():
    text = OPERATIONS.read_text()
    families = {re.sub(r"_(total|bucket|count|sum|created)$", "", n) for n in exported()}
    listed = set(re.findall(r"^\| `(vql_\w+)`", text, re.M)) | set(re.findall(r"`(vql_\w+)`", text))
    assert {f for f in families if f not in listed and f + "_total" not in listed} == set()
    assert {rule["alert"] for rule in rules()} <= set(re.findall(r"`(Vql\w+)`", text))
