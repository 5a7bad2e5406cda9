"""The build's choices: the accelerator and the Ansible strategy (image/strategy.py).
"""

from __future__ import annotations

import pytest

from image_factory.image import buildevents, strategy

pytestmark = pytest.mark.unit


def test_auto_strategy_follows_the_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    assert strategy.resolve_ansible_strategy("auto", "kvm").name == "linear"
    assert strategy.resolve_ansible_strategy("auto", "tcg").name == "mitogen_linear"
    assert strategy.resolve_ansible_strategy("auto", "tcg", "fedora").name == "linear"  # Python 3.14+: unproven
    assert strategy.resolve_ansible_strategy("mitogen", "tcg", "fedora").name == "mitogen_linear"  # asked for
    assert strategy.resolve_ansible_strategy("mitogen", "kvm").name == "mitogen_linear"
    assert strategy.resolve_ansible_strategy("linear", "tcg").name == "linear"
    monkeypatch.setattr(strategy, "mitogen_strategy_dir", lambda: None)
    fallback = strategy.resolve_ansible_strategy("auto", "tcg")
    assert fallback.name == "linear" and "mitogen is not installed" in fallback.why
    with pytest.raises(buildevents.BuildError, match="mitogen package is not installed"):
        strategy.resolve_ansible_strategy("mitogen", "tcg")


@pytest.mark.parametrize(("family", "release", "core", "warned"), [
    ("fedora", 45, (2, 19), "Python 3.15, which ansible-core 2.19 does not support as a target (up to 3.13)"),
    ("fedora", 44, (2, 19), "Use ansible-core 2.20+"),
    ("fedora", 44, (2, 20), ""),
    ("fedora", 45, (2, 21), "No ansible-core release known here supports it yet"),
    ("fedora", 45, (2, 30), ""),
    ("debian", 13, (2, 19), ""),
    ("debian", 14, (2, 19), ""),  # not known here: no guess
])
def test_ansible_core_too_old_for_the_targets_python_is_named(family: str, release: int, core: tuple[int, int],
                                                              warned: str) -> None:
    message = strategy.ansible_target_warning(family, release, core)
    assert (warned in message and message) if warned else message == ""
