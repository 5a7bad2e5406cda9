"""The `image-factory` command: invoke's Program over the task collection that tasks.py also serves.

A checkout keeps `invoke <task>` (tasks.py imports ``ns`` from here); an installed package has
`image-factory <task>`. Both read the same settings: the ``factory`` defaults below, then the site's
invoke.yaml (the directory named by INVOKE_FACTORY_SITE_DIR, else the current one), then INVOKE_FACTORY_*
variables and flags.
"""

from __future__ import annotations

import os
from pathlib import Path

from invoke.collection import Collection
from invoke.program import Program

from image_factory import __version__
from image_factory.settings import DEFAULTS
from image_factory.tasks import (
    build,
    deploy,
    doctor,
    host,
    image,
    inventory,
    lab,
    mac,
    opnsense,
    pipeline,
    publish,
    tenant,
)
from image_factory.tasks._common import name_tasks


def namespace() -> Collection:
    ns = Collection()
    for module in (inventory, build, image, publish, deploy, mac, opnsense, tenant, host, lab):
        ns.add_collection(module.ns)
    ns.add_task(pipeline.pipeline_task, name="pipeline")
    ns.add_task(pipeline.demo, name="demo")
    ns.add_task(doctor.doctor, name="doctor")
    ns.configure({"factory": dict(DEFAULTS)})
    return name_tasks(ns)


ns = namespace()


class FactoryProgram(Program):
    """invoke reads a project's invoke.yaml only beside a tasks.py it found; the packaged collection has none,
    so the site directory stands in for it."""

    def parse_collection(self) -> None:
        super().parse_collection()
        self.config.set_project_location(os.environ.get("INVOKE_FACTORY_SITE_DIR") or str(Path.cwd()))
        self.config.load_project()


program = FactoryProgram(namespace=ns, version=__version__, name="image-factory", binary="image-factory")


def main() -> None:
    program.run()
