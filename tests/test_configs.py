"""Every file in configs/ loads into a valid JanusFlowConfig (OmniMamba's: its system config); the 1.3B config has
the released parameter count."""

import importlib
import pathlib

import jax
import numpy as np
import pytest

from janusflow_jax.models import janusflow as model_lib
from janusflow_jax.models.config import JanusFlowConfig

CONFIG_NAMES = sorted(p.stem for p in (pathlib.Path(__file__).parents[1] / "configs").glob("*.py")
                      if not p.stem.startswith("_"))  # _base.py: the defaults the stage configs share

RELEASED_PARAMS = 2_046_367_504  # docs/reference.md §1: all tensors of MultiModalityCausalLM (1.3B)
REPA_PARAMS = 2048 * 2048 + 2048 + 2048 * 2048 + 2048 + 2048 * 1024 + 1024


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_file_loads(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    assert config.is_locked
    if config.get("family") == "omnimamba":  # configs/omnimamba_*.py: the system config (tests/test_omnimamba_configs.py)
        from janusflow_jax.models.omnimamba import OmniMambaSystemConfig

        system = OmniMambaSystemConfig.from_dict(config.model.to_dict())
        # The release's stage configs keep its 72-token prompt; omnimamba_digits is a small system of its own.
        assert system.lm.t2i_prompt_length == (12 if name == "omnimamba_digits" else 72)
    else:
        model_config = JanusFlowConfig.from_dict(config.model.to_dict())
        assert model_config.num_gen_tokens == (model_config.latent_size // model_config.gen_encoder.stride) ** 2
    with pytest.raises(AttributeError):
        config.not_a_field = 1  # locked: typos in overrides are errors


def test_1_3b_parameter_count():
    from configs import janusflow_1_3b

    config = JanusFlowConfig.from_dict(janusflow_1_3b.get_config().model.to_dict())
    abstract = model_lib.abstract_params(config)
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
    assert total == RELEASED_PARAMS + REPA_PARAMS


def test_unknown_keys_are_errors():
    with pytest.raises(ValueError, match="unknown config keys"):
        JanusFlowConfig.from_dict({"llm": {"hidden": 3}})
    with pytest.raises(ValueError, match="remat_policy"):
        JanusFlowConfig(remat_policy="sometimes")
