"""Outer variables φ of the bilevel problem, one module each (peft-style layout)."""

from hf_fg2u.outer.base import OuterModule
from hf_fg2u.outer.data_rater import DataRater
from hf_fg2u.outer.domain_weights import DomainWeights
from hf_fg2u.outer.example_weights import ExampleWeights
from hf_fg2u.outer.soft_prompt import SoftPrompt
from hf_fg2u.outer.weight_net import WeightNet

__all__ = ["DataRater", "DomainWeights", "ExampleWeights", "OuterModule", "SoftPrompt", "WeightNet"]
