"""The lab's own property-string parsing (lab/pve/props.py) and the shape of LabPve: one concern per mixin."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from image_factory.lab import control as control_client
from image_factory.lab.pve import LabPve, formats, props
from image_factory.lab.pve.base import LabNodeBase
from image_factory.lab.pve.control import CONTROL_OPS
from image_factory.lab.pve.members import ClusterMember

pytestmark = pytest.mark.unit


CPU = formats.FORMATS["cpu"].at((9, 2, 0))
NET = formats.FORMATS["net"].at((9, 2, 0))
SCSI = formats.FORMATS["scsi"].at((9, 2, 0))
CICUSTOM = formats.FORMATS["cicustom"].at((9, 2, 0))


@pytest.mark.parametrize(("text", "fmt", "expected"), [
    ("host,flags=+aes", CPU, {"cputype": "host", "flags": "+aes"}),
    ("flags=+aes,host", CPU, {"flags": "+aes", "cputype": "host"}),  # the bare value in any position
    ("flags=+aes, ,host,", CPU, {"flags": "+aes", "cputype": "host"}),  # blank parts are skipped
    ("cputype=0,host", CPU, {"cputype": "host"}),  # Perl's !$res->{cputype}: a "0" counts as unset
    ("virtio=BC:24:11:00:00:01,bridge=vmbr0", NET, {"model": "virtio", "macaddr": "BC:24:11:00:00:01",
                                                    "bridge": "vmbr0"}),
    ("bridge=vmbr0,virtio", NET, {"bridge": "vmbr0", "model": "virtio"}),
    ("size=8G,volume=local:100/vm-100-disk-0.raw", SCSI, {"size": "8G", "file": "local:100/vm-100-disk-0.raw"}),
    ("local:0,import-from=local:import/a.qcow2", SCSI, {"file": "local:0", "import-from": "local:import/a.qcow2"}),
    ("vendor=local:snippets/v.yaml,user=a=b", CICUSTOM, {"vendor": "local:snippets/v.yaml", "user": "a=b"}),
    ("", CPU, {}),
])
def test_a_property_string_parses_as_pve_json_schema_does(text: str, fmt: props.PropertyFormat,
                                                          expected: dict[str, str]) -> None:
    assert props.parse_property_string(text, fmt) == expected


@pytest.mark.parametrize(("text", "fmt", "message"), [
    ("host,kvm64", CPU, "duplicate key in comma-separated list property: cputype\n"),
    ("cputype=host,kvm64", CPU, "duplicate key in comma-separated list property: cputype\n"),
    ("flags=+aes,flags=-aes", CPU, "duplicate key in comma-separated list property: flags\n"),
    ("host,smt=on", CPU, "invalid key in comma-separated list property: smt\n"),
    ("host,flags=", CPU, "missing key in comma-separated list property\n"),
    ("host,=+aes", CPU, "missing key in comma-separated list property\n"),
    ("local:snippets/v.yaml", CICUSTOM, "value without key, but schema does not define a default key\n"),
    ("model=virtio,e1000=BC:24:11:00:00:01", NET, "key alias 'model' is already defined\n"),
    ("macaddr=BC:24:11:00:00:01,virtio=BC:24:11:00:00:02", NET, "key 'macaddr' is already defined (via alias)\n"),
    ("virtio,e1000", NET, "duplicate key in comma-separated list property: model\n"),
    ("local:1,volume=local:2", SCSI, "key 'file' is already defined (via alias)\n"),
])
def test_a_property_string_pve_refuses_is_refused_with_its_message(text: str, fmt: props.PropertyFormat,
                                                                   message: str) -> None:
    with pytest.raises(props.PropertyStringError) as refused:
        props.parse_property_string(text, fmt)
    assert str(refused.value) == message


def test_before_pve_common_9_1_9_a_key_given_twice_through_an_alias_takes_the_later_value() -> None:
    """pve-common 8.3.1 (PVE 8.4) has no alias conflict check (5d84387 came with 9.1.9)."""
    parsed = props.parse_property_string("local:1,volume=local:2", SCSI, alias_conflicts=False)
    assert parsed == {"file": "local:2"}


@pytest.mark.parametrize(("text", "first_key", "expected"), [
    ("host,flags=+aes", "cputype", {"cputype": "host", "flags": "+aes"}),
    ("cputype=x86-64-v2-AES", "cputype", {"cputype": "x86-64-v2-AES"}),
    ("user=local:snippets/u.yaml,vendor=local:snippets/v.yaml", None,
     {"user": "local:snippets/u.yaml", "vendor": "local:snippets/v.yaml"}),
    ("host,,flags=+aes", "cputype", {"cputype": "host", "flags": "+aes"}),
    ("flags=+aes,host", "cputype", {"flags": "+aes", "cputype": "host"}),  # PVE stores cpu as given
    ("viommu=virtio,q35", "type", {"viommu": "virtio", "type": "q35"}),
    ("", "cputype", {}),
])
def test_a_stored_property_string_splits_with_its_bare_value_under_the_default_key(
        text: str, first_key: str | None, expected: dict[str, str]) -> None:
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
    """node.py's promise: the concerns are independent, so their order in LabPve does not matter. The one
    exception is ClusterMember, a layer over the others (a cluster node's view of status, nodes, clone targets,
    reset): it comes first, so its super() reaches the concern it wraps."""
    concerns = [c for c in LabPve.__mro__ if issubclass(c, LabNodeBase) and c not in (LabPve, LabNodeBase)]
    assert len(concerns) == 13 and concerns[0] is ClusterMember
    owners: dict[str, list[str]] = {}
    for concern in concerns[1:]:
        for name, value in vars(concern).items():
            if callable(value) or isinstance(value, property):
                owners.setdefault(name, []).append(concern.__name__)
    assert {name: who for name, who in owners.items() if len(who) > 1} == {}
    wrapped = {name for name, value in vars(ClusterMember).items() if callable(value) and name in owners}
    assert wrapped == {"_cluster_status", "_nodes", "_qm_clone", "reset", "shutdown"}


def test_every_control_op_the_client_documents_has_a_handler() -> None:
    documented = set(re.findall(r"(\w+)\(", (control_client.__doc__ or "").split("Ops", 1)[1]))
    assert {"fail", "datacenter", "hold_storage_lock", "release", "reset"} <= documented
    assert documented <= set(CONTROL_OPS), documented - set(CONTROL_OPS)
    assert all(callable(getattr(LabPve, handler, None)) for handler in CONTROL_OPS.values())
