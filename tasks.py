"""Invoke entry point: composes the task collections; all logic lives in src/image_factory."""

from invoke.collection import Collection

from image_factory.settings import DEFAULTS
from image_factory.tasks import build, deploy, host, image, inventory, lab, mac, opnsense, pipeline, publish, tenant
from image_factory.tasks._common import name_tasks

ns = Collection()
for module in (inventory, build, image, publish, deploy, mac, opnsense, tenant, host, lab):
    ns.add_collection(module.ns)
ns.add_task(pipeline.pipeline_task, name="pipeline")
ns.add_task(pipeline.demo, name="demo")
ns.configure({"factory": dict(DEFAULTS)})
name_tasks(ns)
