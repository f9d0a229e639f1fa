"""hf_fg2u: bilevel meta-tuning of language models with (FG)²U hypergradients."""

__version__ = "0.1.0"

from .config import BilevelConfig  # noqa: E402
from .evaluation import choice_accuracy  # noqa: E402
from .final_stage import WeightedLossTrainer, train_final_adapter  # noqa: E402
from .outer import DomainWeights, ExampleWeights, OuterModule, SoftPrompt, WeightNet  # noqa: E402
from .trainer import BilevelTrainer  # noqa: E402

__all__ = [
    "BilevelConfig",
    "BilevelTrainer",
    "DomainWeights",
    "ExampleWeights",
    "OuterModule",
    "SoftPrompt",
    "WeightNet",
    "WeightedLossTrainer",
    "choice_accuracy",
    "train_final_adapter",
    "__version__",
]
