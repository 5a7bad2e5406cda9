"""Invoke entry point: composes the task collections; all logic lives in src/image_factory."""

from invoke.collection import Collection

from image_factory.settings import DEFAULTS
from image_factory.tasks import build, deploy, image, inventory, lab, mac, publish

ns = Collection()
for module in (inventory, build, image, publish, deploy, mac, lab):
    ns.add_collection(module.ns)
ns.configure({"factory": dict(DEFAULTS)})
