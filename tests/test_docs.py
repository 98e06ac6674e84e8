"""Documentation and configs stay in step with the code."""

from __future__ import annotations

import inspect

import pytest
from omegaconf import OmegaConf

import isstad_plugin
from isstad_plugin.docs import configuration_reference
from isstad_plugin.models.components.base import COMPONENTS
from tests.conftest import REPO


def test_configuration_reference_is_current() -> None:
    written = (REPO / "docs" / "configuration.md").read_text()
    assert written == configuration_reference(), "run: python -m isstad_plugin.docs"


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_configs_list_every_model_option(config: str) -> None:
    """Each model config names every constructor option, so users see what they can change."""
    model = OmegaConf.load(REPO / "configs" / config).model
    model_class = getattr(isstad_plugin, model.class_path.rsplit(".", 1)[-1])
    options = set(inspect.signature(model_class.__init__).parameters) - {"self", *COMPONENTS}
    assert set(model.init_args) == options


def test_readmes_reference_existing_figures() -> None:
    for readme in [REPO / "README.md", *REPO.glob("isstad_plugin/models/*/README.md")]:
        for line in readme.read_text().splitlines():
            for target in [part.split(")")[0] for part in line.split("](")[1:]]:
                if not target.startswith(("http", "#")):
                    assert (readme.parent / target).exists(), f"{readme}: broken link {target}"
