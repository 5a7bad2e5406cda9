"""The lab's own property-string parsing (lab/pve/props.py) and the shape of LabPve: one concern per mixin."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from image_factory.lab import control as control_client
from image_factory.lab.pve import LabPve, props
from image_factory.lab.pve.base import LabNodeBase
from image_factory.lab.pve.control import CONTROL_OPS

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("text", "first_key", "expected"), [
    ("host,flags=+aes", "cputype", {"cputype": "host", "flags": "+aes"}),
    ("cputype=x86-64-v2-AES", "cputype", {"cputype": "x86-64-v2-AES"}),
    ("user=local:snippets/u.yaml,vendor=local:snippets/v.yaml", None,
     {"user": "local:snippets/u.yaml", "vendor": "local:snippets/v.yaml"}),
    ("host,,flags=+aes", "cputype", {"cputype": "host", "flags": "+aes"}),
    ("flags=+aes,host", "cputype", {"flags": "+aes", "host": ""}),  # a later bare part is a key: refused as unknown
    ("", "cputype", {}),
])
def test_property_strings_split_into_keys_with_the_default_key_first(text: str, first_key: str | None,
                                                                     expected: dict[str, str]) -> None:
    assert props.split_props(text, first_key) == expected


@pytest.mark.parametrize(("size", "text"), [(4 * 1024 ** 2, "4M"), (528 * 1024, "528K"), (32 * 1024 ** 3, "32G"),
                                            (2 * 1024 ** 4, "2T"), (1536 * 1024 ** 2, "1536M"), (1000, "1000"),
                                            (0, "0")])
def test_sizes_are_written_in_the_largest_unit_that_divides_them_and_read_back(size: int, text: str) -> None:
    assert props.format_size(size) == text
    assert props.parse_size(text) == size


def test_a_size_that_is_not_one_is_refused() -> None:
    with pytest.raises(ValueError, match="not a size"):
        props.parse_size("big")


def test_tags_split_as_pve_split_list_and_are_stored_lowercased_unique_and_sorted() -> None:
    assert props.split_tags("b;a, c  d") == ["b", "a", "c", "d"]
    assert props.split_tags(None) == []
    assert props.format_tags("Web;db,web") == "db;web"


def test_the_lab_never_imports_the_products_codec() -> None:
    """The lab is the oracle the codec is tested against (the forbidden contract in pyproject says the same)."""
    sources = Path(props.__file__).parent.glob("*.py")
    imports = re.compile(r"^\s*(from|import) image_factory\.(pve\.codec|units)\b"
                         r"|^\s*from image_factory\.pve import .*codec", re.MULTILINE)
    offenders = [p.name for p in sources if imports.search(p.read_text())]
    assert offenders == []


def test_each_concern_overrides_its_own_methods_only() -> None:
    """node.py's promise: the concerns are independent, so their order in LabPve does not matter."""
    concerns = [c for c in LabPve.__mro__ if issubclass(c, LabNodeBase) and c not in (LabPve, LabNodeBase)]
    assert len(concerns) == 12
    owners: dict[str, list[str]] = {}
    for concern in concerns:
        for name, value in vars(concern).items():
            if callable(value) or isinstance(value, property):
                owners.setdefault(name, []).append(concern.__name__)
    assert {name: who for name, who in owners.items() if len(who) > 1} == {}


def test_every_control_op_the_client_documents_has_a_handler() -> None:
    documented = set(re.findall(r"(\w+)\(", (control_client.__doc__ or "").split("Ops", 1)[1]))
    assert {"fail", "datacenter", "hold_storage_lock", "release", "reset"} <= documented
    assert documented <= set(CONTROL_OPS), documented - set(CONTROL_OPS)
    assert all(callable(getattr(LabPve, handler, None)) for handler in CONTROL_OPS.values())
