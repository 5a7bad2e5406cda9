"""How a build runs: the accelerator (KVM or TCG) and the Ansible strategy, with the checks on both settings."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from image_factory import families, options
from image_factory.image import qemuvm
from image_factory.image.buildevents import BuildError, BuildSettingError
from image_factory.settings import Settings


def detect_accelerator() -> Literal["kvm", "tcg"]:
    return qemuvm.detect_accelerator()


ACCELERATORS = ("auto", "kvm", "tcg")


def check_options(settings: Settings, accelerator: str | None, ansible_strategy: str | None) -> None:
    """--accelerator and --ansible-strategy (or their factory.* settings), before anything runs."""
    options.one_of("--accelerator", accelerator or settings.accelerator, ACCELERATORS)
    options.one_of("--ansible-strategy", ansible_strategy or settings.ansible_strategy, ANSIBLE_STRATEGIES)


def resolve_accelerator(settings: Settings, accelerator: str) -> Literal["kvm", "tcg"]:
    choice = accelerator if accelerator and accelerator != "auto" else settings.accelerator
    if choice in ("kvm", "tcg"):
        return choice  # type: ignore[return-value]
    if choice not in ("auto", ""):
        raise BuildSettingError(f"accelerator {choice!r} (--accelerator or factory.accelerator) is not one of "
                                "auto, kvm, tcg")
    return detect_accelerator()


# ------------------------------------------------------------------------------ ansible strategy

ANSIBLE_STRATEGIES = ("auto", "mitogen", "linear")


@dataclass(frozen=True)
class AnsibleStrategy:
    """How Packer's Ansible provisioner runs the baseline: the strategy and the environment it needs."""

    name: Literal["linear", "mitogen_linear"]
    why: str
    env: dict[str, str] = field(default_factory=dict)


def mitogen_strategy_dir() -> Path | None:
    """The strategy plugin directory of the installed mitogen package, or None without it."""
    spec = importlib.util.find_spec("ansible_mitogen")
    if spec is None or not spec.submodule_search_locations:
        return None
    plugins = Path(next(iter(spec.submodule_search_locations))) / "plugins" / "strategy"
    return plugins if (plugins / "mitogen_linear.py").is_file() else None


def resolve_ansible_strategy(choice: str, accelerator: str, family: str = "debian") -> AnsibleStrategy:
    """auto: mitogen under TCG, where every task otherwise starts a fresh Python in the guest (3-7 s
    each), for families where mitogen is proven; stock linear under KVM, where that costs well under a
    second and reliability wins, and for every other family."""
    if choice not in ANSIBLE_STRATEGIES:
        raise BuildSettingError(f"ansible strategy {choice!r} (--ansible-strategy or factory.ansible_strategy) "
                                f"is not one of {', '.join(ANSIBLE_STRATEGIES)}")
    linear_env = {"ANSIBLE_STRATEGY": "linear"}
    if choice == "linear":
        return AnsibleStrategy("linear", "factory.ansible_strategy=linear", linear_env)
    if choice == "auto" and accelerator == "kvm":
        return AnsibleStrategy("linear", "auto: KVM", linear_env)
    if choice == "auto" and not families.get(family).mitogen_proven:
        return AnsibleStrategy("linear", f"auto: mitogen is not proven on {family} guests", linear_env)
    plugins = mitogen_strategy_dir()
    if plugins is None:
        if choice == "mitogen":
            raise BuildError("factory.ansible_strategy=mitogen, but the mitogen package is not installed in "
                             "this environment: pip install mitogen (or set ansible_strategy to auto or linear)")
        return AnsibleStrategy("linear", "auto: TCG, but mitogen is not installed", linear_env)
    why = "factory.ansible_strategy=mitogen" if choice == "mitogen" else "auto: TCG"
    env = {"ANSIBLE_STRATEGY": "mitogen_linear", "ANSIBLE_STRATEGY_PLUGINS": str(plugins)}
    return AnsibleStrategy("mitogen_linear", why, env)


# The newest target Python each ansible-core release supports (ansible-test's constants in its wheel, read
# 2026-11); a core newer than these is not second-guessed. None supports Fedora 45's Python 3.15 yet.
ANSIBLE_CORE_TARGET_PYTHON = {(2, 19): (3, 13), (2, 20): (3, 14), (2, 21): (3, 14)}


def ansible_target_warning(family: str, release: int, core: tuple[int, int] | None = None) -> str:
    """Why this controller's ansible-core may not drive the release's Python, and the way out; "" if it can."""
    want = families.get(family).target_python(release)
    if core is None:
        try:
            # optional and slow to import (ansible-core's package): only when the caller did not say
            from ansible.release import __version__
        except ImportError:
            return ""  # no ansible-core here: the build's own check names that
        core = (int(__version__.split(".")[0]), int(__version__.split(".")[1]))
    if want is None or core > max(ANSIBLE_CORE_TARGET_PYTHON):
        return ""
    newest = ANSIBLE_CORE_TARGET_PYTHON.get(core, (0, 0))
    if want <= newest:
        return ""
    fits = [c for c, py in sorted(ANSIBLE_CORE_TARGET_PYTHON.items()) if py >= want]
    if fits:
        way_out = (f"Use ansible-core {fits[0][0]}.{fits[0][1]}+ (it needs Python 3.12+ on this machine: make the "
                   "venv with a newer Python)")
    else:
        way_out = "No ansible-core release known here supports it yet: watch for one and upgrade"
    return (f"{family} {release} runs Python {want[0]}.{want[1]}, which ansible-core {core[0]}.{core[1]} does not "
            f"support as a target (up to {newest[0]}.{newest[1]}): the build may fail in Ansible. {way_out}")


