"""hf_fg2u: bilevel meta-tuning of language models with (FG)²U hypergradients."""

__version__ = "0.1.0"
