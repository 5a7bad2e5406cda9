"""Publish: put a tested build artifact on every hypervisor and register it as a template.

Shaped like deploy/: ``model`` (artifact, plan, result, report, errors), ``names`` (import file, template
name, tags, the description's lines), ``gather`` (one host's state, read under the host lock), ``decide``
(pure: state in, HostPlan out; table-tested in tests/unit/publish/test_decide.py), ``send`` (transports),
``register`` (create, template, clean up), ``act`` (lock, rounds, execute, retain), ``present`` (progress)
and ``run`` (publish_image). The plan is the same object the dry run prints: there is one code path.

Design choices (see also pve/upload.py):
- Host lock: a publish holds ``flock`` on ``<import_dir>/.image-factory-publish.lock`` through an
  SSH exec channel for the whole converge (gather + decide + act) of a host. The kernel drops the lock
  when the holder's process dies, so a crashed or cut publish never leaves a stale lock; the
  holder writes ``<lock>.owner`` (host, pid, run id, time) so a waiting run can say whom it waits
  for. Both transports take it (the API transport still uses SSH for the lock and the remote
  checks). As a second line, "VM <id> already exists" at create re-plans onto the next free id.
- VMID: the lowest id of ``template_vmids`` that no guest on the node uses (never cluster/nextid).
- Identity: a template belongs to the factory when its tags contain ``image-factory`` and its
  description starts with the factory header (ownership.owns_template); the description carries image,
  build id, sha256, manifest digest, image-test result, import file, publish time and run id. The same
  digest on the host means "already published": nothing changes and 0 bytes are sent.
- Cleanup: a failure after create destroys the VM this run created (found by vmid + run id);
  a failure during the upload removes the partial file. A finished, verified import file (final
  name) is KEPT: it is complete and checked, the re-run skips its upload, and retention removes it
  together with its template. Leftovers of a crashed run (kill -9): non-template factory VMs
  and partial uploads of other builds are found under the lock and removed by the next run's
  plan; this build's own partial is resumed.
- A dropped SSH link mid-upload: the upload reconnects and resumes; the host lock (same link) is
  gone too, so the run re-takes it and re-plans before registering (the plan then finds the
  verified file, or a template another run made meanwhile).
- Faults: PVE's "can't lock file ... got timeout" on create/template/destroy is retried (noted in
  the warnings); any other error ends the host's publish with PVE's message after the cleanup
  above. Hosts are independent: one failing host does not stop the others.
- Retention: newest ``keep`` templates of the image per host (the one just published always
  counts), by publish time; a template whose base disks are referenced by another VM (linked
  clones) is kept and reported. Decided in ``decide``; act re-reads the configs just before each
  prune and applies the same rule, since a clone may land between the plan and the prune.
"""

from image_factory.publish.act import converge_host
from image_factory.publish.decide import HostState, decide
from image_factory.publish.model import (
    DEFAULT_KEEP,
    Artifact,
    HostFailed,
    HostPlan,
    HostResult,
    PublishError,
    PublishReport,
)
from image_factory.publish.names import import_file_name, template_description, template_name, template_tags
from image_factory.publish.register import create_params
from image_factory.publish.run import check_inputs, load_artifact, publish_image

__all__ = [
    "DEFAULT_KEEP", "Artifact", "HostFailed", "HostPlan", "HostResult", "HostState", "PublishError", "PublishReport",
    "check_inputs", "converge_host", "create_params", "decide", "import_file_name", "load_artifact", "publish_image",
    "template_description", "template_name", "template_tags",
]
