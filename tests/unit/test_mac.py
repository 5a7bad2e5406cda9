"""The MAC namespace: checker, generator (round-trip YAML), and hypothesis properties (exports: test_dhcp.py)."""

from __future__ import annotations

import difflib
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from invoke.context import Context
from invoke.exceptions import Exit

from image_factory.errors import ValidationFailed
from image_factory.settings import REPO_ROOT
from image_factory.site import mac
from image_factory.site.inventory import load_site, mac_problem, normalize_mac
from image_factory.tasks import mac as mac_tasks

from .example_site import copy_example, edit, flat_example

pytestmark = pytest.mark.unit

EXAMPLE = REPO_ROOT / "ansible/inventory/hosts.yml"
IMAGES = REPO_ROOT / "packer/images.yml"
METRICS = '"02:de:10:01:01:00"'
EXTRA_VM = """
        extra01:
          # a VM still carrying a Proxmox-generated MAC
          vm:
            vmid: 1103
            image: fedora-44
            role: observability
            nics:
              - {mac: "BC:24:11:0A:0B:0C"}  # from the old VM
"""


@pytest.fixture
def inv(tmp_path: Path) -> Path:
    return copy_example(tmp_path)


def problems(path: Path, images: Path | None = IMAGES) -> list:
    with pytest.raises(ValidationFailed) as exc:
        mac.check(path, images)
    return exc.value.problems


def only(probs: list, entry: str) -> list[str]:
    return [p.message for p in probs if p.entry == entry]


# ---------------------------------------------------------------------------------------- checker


def test_example_site_passes_and_every_mgmt_vm_is_in_the_namespace() -> None:
    assert mac.check(EXAMPLE, IMAGES) == 7
    site = load_site(EXAMPLE.parent, IMAGES)
    mgmt = [vm for vm in site.vms.values() if vm.plane == "mgmt"]
    assert mgmt
    for vm in mgmt:
        for i, m in enumerate(vm.macs):
            ns = mac.NamespaceMac.parse(m)
            assert (ns.plane, ns.role, ns.nic) == ("mgmt", vm.role, i)


@pytest.mark.parametrize(
    ("bad", "expect"),
    [
        ("03:de:10:01:01:00", "is a multicast address"),
        ("00:de:10:01:01:00", "is not locally administered"),
        ("BC:24:11:12:34:56", "Proxmox's OUI"),
        ("00:50:56:12:34:56", "vendor (universally administered) OUI"),
        ("52:54:00:12:34:56", "outside the deevnet namespace"),  # QEMU's locally administered default
        ("02:de:10:01:01", "has 5 group(s), a MAC has 6"),
        ("02:de:10:01:01:00:00", "has 7 group(s)"),
        ("02:de:10:01:01:0g", "contains 'g'"),
        ("02:de:10:01:1:00", "not two hex digits"),
        ("06:ab:10:01:01:00", "outside the deevnet namespace"),
        ("02:de:20:01:01:00", "byte 2 (plane) 20 means tenant, but the VM is in the mgmt plane"),
        ("02:de:30:01:01:00", "byte 2 (plane) 30 is not a plane code"),
        ("02:de:10:02:01:00", "byte 3 (role) 02 means automation, but the VM's role is observability"),
        ("02:de:10:01:00:00", "host index) 00 is reserved"),
        ("02:de:10:01:01:01", "byte 5 (NIC index) is 01, but this is NIC 0"),
    ],
)
def test_each_kind_of_bad_mac_fails_with_file_host_and_reason(inv: Path, bad: str, expect: str) -> None:
    edit(inv, METRICS, f'"{bad}"')
    probs = problems(inv)
    mine = [p for p in probs if p.entry == "metrics01"]
    assert any(expect in p.message for p in mine), probs
    assert all(p.file == str(inv) for p in mine)
    assert {p.key for p in mine} <= {"vm.nics.0.mac"}
    # and the task exits non-zero
    with pytest.raises(Exit) as exc:
        mac_tasks.check(Context(), inventory=str(inv), catalogue=str(IMAGES))
    assert exc.value.code != 0


def test_duplicate_within_a_plane_names_both_hosts(inv: Path) -> None:
    edit(inv, '"02:de:10:01:02:00"', METRICS)
    probs = problems(inv)
    assert only(probs, "metrics01") == [f"MAC '02:de:10:01:01:00' is also used by logs01 NIC 0 ({inv})"]
    assert only(probs, "logs01") == [f"MAC '02:de:10:01:01:00' is also used by metrics01 NIC 0 ({inv})"]
    # load_site's own duplicate message is replaced by the per-host ones
    assert not [p for p in probs if "more than once" in p.message]


def test_duplicate_across_hypervisors_is_caught(inv: Path) -> None:
    edit(inv, '"02:de:20:11:01:00"', METRICS)
    probs = problems(inv)
    assert any("also used by iot-api01" in m for m in only(probs, "metrics01"))
    tenant = only(probs, "iot-api01")
    assert any("also used by metrics01" in m for m in tenant)
    assert any("means mgmt, but the VM is in the tenant plane" in m for m in tenant)


def test_nics_must_share_the_host_index(inv: Path) -> None:
    edit(inv, '"02:de:10:03:01:01"', '"02:de:10:03:02:01"')
    probs = problems(inv)
    assert only(probs, "jump01") == [
        "NICs disagree on byte 4 (host index): host 01 on NIC(s) 0; host 02 on NIC(s) 1"
    ]


def test_role_without_code_unquoted_and_missing_macs(inv: Path) -> None:
    edit(inv, "role: automation", "role: quantum")
    edit(inv, '{mac: "02:de:10:01:02:00"}', "{model: virtio}")
    edit(inv, '{mac: "02:de:20:12:01:00"}', "{mac: 12:34:56:12:34:56}")  # YAML 1.1 reads an int
    probs = problems(inv)
    assert any("role 'quantum' has no MAC role code in the mgmt plane" in m for m in only(probs, "runner01"))
    assert only(probs, "logs01") == ["NIC 0 has no MAC; run: invoke mac.generate --vm logs01"]
    assert any("is not a string (quote MACs in YAML)" in m for m in only(probs, "sandbox01"))


def test_all_problems_at_once_including_non_mac_ones(inv: Path) -> None:
    edit(inv, METRICS, '"03:de:10:01:01:00"')
    edit(inv, '"02:de:10:02:01:00"', '"02:de:20:02:01:00"')
    edit(inv, "image: fedora-45\n            role: app", "image: nosuch\n            role: app")
    probs = problems(inv)
    entries = {p.entry for p in probs}
    assert {"metrics01", "runner01", "iot-api01"} <= entries
    assert any("nosuch" in p.message for p in probs)
    assert len(probs) == len(set(probs))


def test_check_without_images_only_checks_macs(inv: Path) -> None:
    edit(inv, "image: fedora-45\n            role: app", "image: nosuch\n            role: app")
    assert mac.check(inv) == 7


# -------------------------------------------------------------------------------------- generator


def diff(before: str, after: str) -> list[str]:
    return [
        line for line in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]


def test_generate_replaces_one_line_and_keeps_everything_else(inv: Path) -> None:
    edit(inv, "    # Tenant workloads", EXTRA_VM + "\n    # Tenant workloads")
    before = inv.read_text()
    changes = mac.generate(inv, "extra01")
    assert [(c.old, c.new) for c in changes] == [("bc:24:11:0a:0b:0c", "02:de:10:01:03:00")]
    assert diff(before, inv.read_text()) == [
        '-              - {mac: "BC:24:11:0A:0B:0C"}  # from the old VM',
        '+              - {mac: "02:de:10:01:03:00"}  # from the old VM',
    ]
    assert mac.check(inv, IMAGES) == 8
    # a re-run converges: nothing changes, not even a byte
    again = inv.read_text()
    assert [c.changed for c in mac.generate(inv, "extra01")] == [False]
    assert inv.read_text() == again


def test_generate_adds_a_nic_beyond_the_existing_ones(inv: Path) -> None:
    before = inv.read_text()
    changes = mac.generate(inv, "jump01", nic=2)
    assert [(c.nic, c.new, c.added_nic) for c in changes] == [(2, "02:de:10:03:01:02", True)]
    assert diff(before, inv.read_text()) == ['+              - {mac: "02:de:10:03:01:02"}']
    assert mac.check(inv, IMAGES) == 8


def test_generate_moves_a_vm_off_a_clashing_host_index(inv: Path) -> None:
    edit(inv, '"02:de:10:01:02:00"', METRICS)  # logs01 copied metrics01's MAC
    mac.generate(inv, "logs01")
    assert 'mac: "02:de:10:01:02:00"' in inv.read_text()  # next after the highest other (01)
    assert mac.check(inv, IMAGES) == 7


def test_generate_fixes_every_nic_of_a_vm(inv: Path) -> None:
    edit(inv, '"02:de:10:03:01:00"', '"02:de:10:03:01:05"')
    edit(inv, '"02:de:10:03:01:01"', '"bc:24:11:00:00:01"')
    changes = mac.generate(inv, "jump01")
    assert [c.new for c in changes] == ["02:de:10:03:01:00", "02:de:10:03:01:01"]
    assert mac.check(inv, IMAGES) == 7


@pytest.mark.parametrize(
    ("vm", "nic", "setup", "expect"),
    [
        ("nosuch", None, None, "no VM named 'nosuch'"),
        ("jump01", 3, None, "NIC 3 is out of range: the VM has 2 NIC(s)"),
        ("runner01", None, ("role: automation", "role: quantum"), "role 'quantum' has no MAC role code"),
        ("pve-mgmt", None, None, "no VM named 'pve-mgmt'"),
    ],
)
def test_generate_refuses_before_writing(inv: Path, vm: str, nic: int | None, setup, expect: str) -> None:
    if setup:
        edit(inv, *setup)
    before = inv.read_text()
    with pytest.raises(ValidationFailed) as exc:
        mac.generate(inv, vm, nic)
    assert expect in str(exc.value)
    assert inv.read_text() == before


def test_generate_refuses_a_file_it_would_reformat(inv: Path) -> None:
    text = inv.read_text().replace("            nics:\n              - {mac: \"02:de:10:01:02:00\"}",
                                   "            nics:\n                  - {mac: \"bc:24:11:00:00:09\"}")
    inv.write_text(text)
    with pytest.raises(ValidationFailed) as exc:
        mac.generate(inv, "logs01")
    assert "without reformatting" in str(exc.value)
    assert inv.read_text() == text


def test_generate_edits_the_right_file_of_an_inventory_directory(tmp_path: Path) -> None:
    data = flat_example()
    tenant = data["all"]["children"].pop("tenant")
    (tmp_path / "10-site.yml").write_text(yaml.safe_dump(data, sort_keys=False, width=4096))
    tenant["hosts"]["sandbox02"] = {
        "vm": {"vmid": 2202, "image": "fedora-45", "role": "experiment", "nics": [{"mac": "bc:24:11:00:00:02"}]}
    }
    second = tmp_path / "20-tenant.yml"
    second.write_text(yaml.safe_dump({"all": {"children": {"tenant": tenant}}}, sort_keys=False, width=4096))
    first_before = (tmp_path / "10-site.yml").read_text()
    [change] = mac.generate(tmp_path, "sandbox02")
    assert (change.file, change.new) == (str(second), "02:de:20:12:02:00")
    assert (tmp_path / "10-site.yml").read_text() == first_before
    assert mac.check(tmp_path, IMAGES) == 8


def test_generate_task_prints_and_writes(inv: Path) -> None:
    mac_tasks.generate(Context(), vm="jump01", nic=2, inventory=str(inv))
    assert "02:de:10:03:01:02" in inv.read_text()
    with pytest.raises(Exit) as exc:
        mac_tasks.generate(Context(), vm="jump01", nic=9, inventory=str(inv))
    assert exc.value.code != 0


def test_generate_edits_a_vm_kept_in_its_host_vars_file(inv: Path) -> None:
    doc = yaml.safe_load(inv.read_text())
    vm = doc["all"]["children"]["mgmt"]["hosts"]["logs01"].pop("vm")
    vm["nics"][0]["mac"] = "bc:24:11:00:00:01"
    inv.write_text(yaml.safe_dump(doc, sort_keys=False, width=4096))
    host_vars = inv.parent / "host_vars" / "logs01.yml"
    host_vars.write_text(yaml.safe_dump({"vm": vm}, sort_keys=False, width=4096))
    inventory_before = inv.read_text()
    [change] = mac.generate(inv.parent, "logs01")
    assert (change.file, change.old, change.new) == (str(host_vars), "bc:24:11:00:00:01", "02:de:10:01:02:00")
    assert yaml.safe_load(host_vars.read_text())["vm"]["nics"][0]["mac"] == "02:de:10:01:02:00"
    assert inv.read_text() == inventory_before
    assert mac.check(inv.parent, IMAGES) == 7


def test_nic0_address_must_agree_with_static_ipconfig(inv: Path) -> None:
    edit(inv, '{mac: "02:de:10:03:01:00"}', '{mac: "02:de:10:03:01:00", address: 192.168.10.31}')
    with pytest.raises(ValidationFailed) as exc:
        load_site(inv, IMAGES)
    assert "disagrees with cloudinit.ipconfig.ip 192.168.10.30/24" in str(exc.value)


# -------------------------------------------------------------------------------------- properties

planes_roles = st.sampled_from([(p, r) for p, roles in mac.ROLE_CODES.items() for r in roles])
hosts = st.integers(mac.HOST_MIN, mac.HOST_MAX)
nics = st.integers(0, mac.NIC_MAX)
byte = st.integers(0, 255)


@given(planes_roles, hosts, nics)
def test_prop_generated_macs_are_valid_and_round_trip(pr: tuple[str, str], host: int, nic: int) -> None:
    plane, role = pr
    ns = mac.NamespaceMac.for_vm(plane, role, host, nic)
    text = str(ns)
    assert text == normalize_mac(text) and mac_problem(text) is None and mac.format_problem(text) is None
    assert text.startswith("02:de:")
    assert mac.namespace_problems(text, plane, role, nic) == []
    assert mac.NamespaceMac.parse(text) == ns
    assert (ns.plane, ns.role, ns.host, ns.nic) == (plane, role, host, nic)
    assert mac.NamespaceMac.parse(text.upper().replace(":", "-")) == ns


@given(st.tuples(byte, byte, byte, byte, byte, byte))
def test_prop_format_parse_round_trip_or_clear_refusal(b: tuple[int, ...]) -> None:
    text = ":".join(f"{x:02X}" for x in b)
    try:
        ns = mac.NamespaceMac.parse(text)
    except mac.MacError as exc:
        assert str(exc).startswith(f"MAC '{text.lower()}'")
        return
    assert str(ns) == text.lower()


@given(st.lists(st.tuples(planes_roles, st.integers(0, 3)), min_size=1, max_size=60))
def test_prop_allocation_is_unique_and_inside_the_namespace(requests: list) -> None:
    used: list[str] = []
    for (plane, role), nic_count in requests:
        host = mac.allocate_host(used, plane, role)
        for nic in range(nic_count + 1):
            used.append(str(mac.NamespaceMac.for_vm(plane, role, host, nic)))
    assert len(set(used)) == len(used)
    for m in used:
        ns = mac.NamespaceMac.parse(m)
        assert mac.HOST_MIN <= ns.host <= mac.HOST_MAX and ns.plane and ns.role


@given(planes_roles, st.sets(hosts, max_size=255))
def test_prop_allocate_host_never_returns_a_taken_index(pr: tuple[str, str], taken: set[int]) -> None:
    plane, role = pr
    used = [str(mac.NamespaceMac.for_vm(plane, role, h, 0)) for h in taken]
    if len(taken) == 255:
        with pytest.raises(mac.MacError, match="are taken"):
            mac.allocate_host(used, plane, role)
        return
    host = mac.allocate_host(used, plane, role)
    assert host not in taken and mac.HOST_MIN <= host <= mac.HOST_MAX


@given(byte.filter(lambda x: x & 1), st.tuples(byte, byte, byte, byte, byte))
def test_prop_multicast_is_refused(first: int, rest: tuple[int, ...]) -> None:
    assert "multicast" in (mac.format_problem(":".join(f"{x:02x}" for x in (first, *rest))) or "")


@given(byte.filter(lambda x: not x & 3), st.tuples(byte, byte, byte, byte, byte))
def test_prop_universally_administered_is_refused(first: int, rest: tuple[int, ...]) -> None:
    assert "not locally administered" in (mac.format_problem(":".join(f"{x:02x}" for x in (first, *rest))) or "")


@given(st.lists(byte, min_size=1, max_size=10).filter(lambda b: len(b) != 6))
def test_prop_wrong_length_is_refused(b: list[int]) -> None:
    assert f"has {len(b)} group(s)" in (mac.format_problem(":".join(f"{x:02x}" for x in b)) or "")


@given(st.tuples(byte, byte, byte, byte, byte, byte), st.integers(0, 16),
       st.characters(exclude_characters="0123456789abcdefABCDEF:-", exclude_categories=("Cs", "Zs", "Cc")))
def test_prop_non_hex_characters_are_refused(b: tuple[int, ...], pos: int, ch: str) -> None:
    text = ":".join(f"{x:02x}" for x in b)
    text = text[:pos] + ch + text[pos + 1:]
    why = mac.format_problem(normalize_mac(text))
    assert why is not None and "is not six colon-separated hex bytes" in why


@given(planes_roles, hosts, nics)
def test_prop_plane_disagreement_is_refused(pr: tuple[str, str], host: int, nic: int) -> None:
    plane, role = pr
    other = "tenant" if plane == "mgmt" else "mgmt"
    text = str(mac.NamespaceMac.for_vm(plane, role, host, nic))
    [why] = mac.namespace_problems(text, other, next(iter(mac.ROLE_CODES[other])), nic)
    assert f"but the VM is in the {other} plane" in why


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(planes_roles, st.integers(1, 3)), min_size=1, max_size=6))
def test_prop_generate_into_an_inventory_always_passes_check(vms: list) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = copy_example(Path(tmp))
        text = EXAMPLE.read_text()
        blocks = {"mgmt": "", "tenant": ""}
        for i, ((plane, role), count) in enumerate(vms):
            first = 1900 if plane == "mgmt" else 2900
            entries = "".join(f'\n              - {{mac: "bc:24:11:00:{i:02x}:{n:02x}"}}' for n in range(count))
            blocks[plane] += (
                f"\n        gen{i:02d}:\n          vm:\n            vmid: {first + i}\n"
                f"            image: fedora-44\n            role: {role}\n            nics:{entries}"
            )
        text = text.replace("\n\n    # Tenant workloads", blocks["mgmt"] + "\n\n    # Tenant workloads")
        path.write_text(text.rstrip("\n") + blocks["tenant"] + "\n")
        for i in range(len(vms)):
            mac.generate(path, f"gen{i:02d}")
        assert mac.check(path, IMAGES) == 7 + sum(c for _, c in vms)


BLOCK_STYLE = """\
all:
  children:
    mgmt:
      hosts:
        a01:
          vm:
            vmid: 1001
            role: automation
            nics:
            - mac: 'bc:24:11:00:00:01'  # old
              bridge: vmbr0
        b01:
          vm:
            vmid: 1002
            role: automation
"""


def test_generate_keeps_block_style_and_quoting_and_creates_missing_nics(tmp_path: Path) -> None:
    path = tmp_path / "hosts.yml"
    path.write_text(BLOCK_STYLE)
    mac.generate(path, "a01")
    mac.generate(path, "a01", nic=1)
    mac.generate(path, "b01")
    assert diff(BLOCK_STYLE, path.read_text()) == [
        "-            - mac: 'bc:24:11:00:00:01'  # old",
        "+            - mac: '02:de:10:02:01:00'  # old",
        '+            - mac: "02:de:10:02:01:01"',
        "+            nics:",
        '+            - mac: "02:de:10:02:02:00"',
    ]
    assert mac.check(path) == 3


def test_nic_flag_parsing() -> None:
    assert mac.parse_nic(None) is None
    assert mac.parse_nic("3") == 3
    for bad in ("x", "-1", "8", "1.5"):
        with pytest.raises(ValidationFailed, match="must be a NIC index 0-7"):
            mac.parse_nic(bad)


def test_cli_check_exits_non_zero_and_names_file_and_host(inv: Path) -> None:
    import subprocess
    import sys

    edit(inv, METRICS, '"03:de:10:01:01:00"')
    invoke = Path(sys.executable).with_name("invoke")
    res = subprocess.run(
        [str(invoke), "mac.check", "--inventory", str(inv)], cwd=REPO_ROOT, capture_output=True, text=True,
        env={"COLUMNS": "400", "PATH": "/usr/bin:/bin"}, check=False,
    )
    assert res.returncode == 2, res
    assert f"{inv}: metrics01: vm.nics.0.mac: MAC '03:de:10:01:01:00' is a multicast address" in res.stderr
    ok = subprocess.run(
        [str(invoke), "mac.generate", "--vm", "metrics01", "--nic", "0", "--inventory", str(inv)],
        cwd=REPO_ROOT, capture_output=True, text=True, check=False,
    )
    assert ok.returncode == 0, ok
    # a broken MAC holds no host index: the VM gets the next one above logs01's 02
    assert 'mac: "02:de:10:01:03:00"' in inv.read_text()
    assert "metrics01 NIC 0: 03:de:10:01:01:00 -> 02:de:10:01:03:00" in ok.stderr
