"""Outer variables φ of the bilevel problem, one module each (peft-style layout)."""

from .base import OuterModule
from .domain_weights import DomainWeights
from .example_weights import ExampleWeights
from .soft_prompt import SoftPrompt
from .weight_net import WeightNet

__all__ = ["DomainWeights", "ExampleWeights", "OuterModule", "SoftPrompt", "WeightNet"]
