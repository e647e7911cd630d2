"""Every shipped YAML preset parses against its schema (typos in presets fail here, not on a GPU)."""


import pytest

from tests.support import REPO
from tracerl.config import load_config
from tracerl.eval import EvalConfig
from tracerl.rl import RLConfig
from tracerl.recipes.sft import SFTConfig

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
SCHEMAS = {"sft": SFTConfig, "eval": EvalConfig, "rl": RLConfig}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_preset_parses(path):
    schema = SCHEMAS.get(path.name.split("-")[0])
    if schema is None:
        pytest.skip(f"no schema registered for {path.name} yet")
    config = load_config(schema, path)
    assert config.model
