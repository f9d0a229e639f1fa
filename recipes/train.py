"""Run a recipe from a YAML config, CLI flags overriding it (the same as `hf-fg2u train`).

python recipes/train.py --recipe noisy_reweighting --max_steps 20
"""

from hf_fg2u.cli.arguments import parse_args
from hf_fg2u.cli.recipe_run import main

if __name__ == "__main__":
    main(*parse_args())
