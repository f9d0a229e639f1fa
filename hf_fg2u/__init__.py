"""hf_fg2u: bilevel meta-tuning of language models with (FG)²U hypergradients."""

__version__ = "0.1.0"

from hf_fg2u.hub.load import load_run  # noqa: E402
from hf_fg2u.lm.evaluation import choice_accuracy  # noqa: E402
from hf_fg2u.outer import DataRater, DomainWeights, ExampleWeights, OuterModule, SoftPrompt, WeightNet  # noqa: E402
from hf_fg2u.trainer.bilevel import BilevelTrainer  # noqa: E402
from hf_fg2u.trainer.config import BilevelConfig  # noqa: E402
from hf_fg2u.trainer.weighted_loss import WeightedLossTrainer, train_final_adapter  # noqa: E402
from hf_fg2u.trainer.weighted_mixin import WeightCollator, WeightedLossMixin, check_keeps_weights  # noqa: E402

__all__ = [
    "BilevelConfig",
    "BilevelTrainer",
    "DataRater",
    "DomainWeights",
    "ExampleWeights",
    "OuterModule",
    "SoftPrompt",
    "WeightNet",
    "WeightCollator",
    "WeightedLossMixin",
    "WeightedLossTrainer",
    "check_keeps_weights",
    "choice_accuracy",
    "load_run",
    "train_final_adapter",
    "__version__",
]
