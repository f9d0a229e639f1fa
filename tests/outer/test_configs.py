"""Each outer module's typed config: built and checked with the module, saved and compared as the module's identity."""

import dataclasses

import pytest

from hf_fg2u import DomainWeights, ExampleWeights, SoftPrompt, WeightNet
from hf_fg2u.outer.base import OuterModule


@pytest.mark.parametrize(
    "module",
    [
        ExampleWeights(6, parametrization="sigmoid", num_groups=2),
        DomainWeights(["a", "b"], init=[0.5, -0.5]),
        WeightNet(hidden_size=4, domains=["x", "y"]),
        SoftPrompt(2, 8),
    ],  # fmt: skip
)
def test_a_saved_module_comes_back_with_an_equal_typed_config(tmp_path, module):
    assert isinstance(module.config, module.config_class) and dataclasses.is_dataclass(module.config)
    with pytest.raises(dataclasses.FrozenInstanceError):
        module.config.__setattr__(dataclasses.fields(module.config)[0].name, None)
    module.save_pretrained(tmp_path)
    loaded = OuterModule.from_pretrained(tmp_path)
    assert type(loaded) is type(module) and loaded.config == module.config


def test_bad_arguments_are_refused_by_the_config():
    with pytest.raises(ValueError, match="init has 3 logits for 2 domains"):
        DomainWeights(["a", "b"], init=[0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="hidden_size >= 1"):
        WeightNet(hidden_size=0)
    with pytest.raises(TypeError, match="ExampleWeights's config must be of type ExampleWeightsConfig, got dict"):
        OuterModule.__init__(ExampleWeights.__new__(ExampleWeights), {"num_examples": 3})
