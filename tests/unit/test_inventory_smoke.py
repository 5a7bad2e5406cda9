import pytest

from image_factory.inventory import load_site
from image_factory.settings import REPO_ROOT

pytestmark = pytest.mark.unit


def test_example_site_validates():
    site = load_site(REPO_ROOT / "ansible/inventory", REPO_ROOT / "packer/images.yml")
    assert {h.role for h in site.hypervisors.values()} == {"mgmt", "tenant"}
    assert all(site.hypervisor_for(vm).role == vm.plane for vm in site.vms.values())
