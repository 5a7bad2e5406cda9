"""Reports are serialised from their dataclasses."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from image_factory.reports import Report, as_json

pytestmark = pytest.mark.unit


@dataclass
class Inner(Report):
    json_properties = ("double",)

    n: int
    seconds: float = 0.123456

    @property
    def double(self) -> int:
        return 2 * self.n


@dataclass
class Outer(Report):
    json_properties = ("ok",)

    name: str
    items: list[Inner] = field(default_factory=list)
    by_host: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(i.n > 0 for i in self.items)


def test_every_field_nested_reports_and_named_properties() -> None:
    report = Outer("x", [Inner(1), Inner(0, 2.0)], {"a": (1, 2)})
    assert report.to_dict() == {
        "name": "x", "ok": False, "by_host": {"a": [1, 2]},
        "items": [{"n": 1, "seconds": 0.123, "double": 2}, {"n": 0, "seconds": 2.0, "double": 0}],
    }
    json.dumps(report.to_dict())  # plain JSON types only


def test_a_new_field_reaches_the_json_without_touching_a_serialiser() -> None:
    @dataclass
    class Grown(Inner):
        added: str = "new"

    assert Grown(3).to_dict()["added"] == "new" and as_json([Grown(3)])[0]["double"] == 6


def test_the_reports_of_the_stages_serialise() -> None:
    from image_factory.deploy import DeployPlan, FieldDiff, VmPlan
    from image_factory.preflight import CheckResult

    plan = DeployPlan([VmPlan("a", "tenant", "h", "n", 2001, "drift", diffs=[FieldDiff("memory", "1", "2", True)])])
    data = plan.to_dict()
    assert data["counts"] == {"drift": 1} and data["vms"][0]["diffs"][0]["field"] == "memory"
    assert CheckResult("tls", False, "bad", "fix", skipped=True).to_dict()["status"] == "skip"
