"""ownership: the one answer to "is this ours?" for a published template and a deployed VM."""

from __future__ import annotations

import pytest

from image_factory.ownership import TEMPLATE_HEADER, marker_block, owns_template, owns_vm, tagged

pytestmark = pytest.mark.unit


def test_a_template_is_ours_by_its_tag_and_its_description_header_both() -> None:
    described = f"{TEMPLATE_HEADER}\nimage: debian-lab\n"
    assert owns_template(("image-factory", "tested"), described)
    assert owns_template(["image-factory"], f"  {TEMPLATE_HEADER}  \n")  # PVE may keep stray blanks
    assert not owns_template(("tested",), described)  # the header typed by hand on an untagged VM
    assert not owns_template(("image-factory",), "hand made")  # the tag set in the UI on a human's template
    assert not owns_template(("image-factory",), f"note\n{TEMPLATE_HEADER}")  # the header must open it
    assert not owns_template(("image-factory",), None)
    assert tagged(("image-factory",)) and not tagged(("image-factory-x",))


def test_a_vm_is_ours_by_its_marker_for_its_own_vmid() -> None:
    block = marker_block(vm_name="metrics01", vmid=201, template="tpl", template_vmid=9000, run_id="r1",
                         incomplete=False)
    assert owns_vm(f"user text\n\n{block}", 201)
    assert not owns_vm(block, 202)  # copied onto another VM
    assert not owns_vm(block.replace("metrics01", "metrics02"), 201)  # edited: the seal breaks
    assert not owns_vm("managed by hand", 201)
