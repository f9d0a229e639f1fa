"""Run a recipe from a YAML config, CLI flags overriding it (the same as `hf-fg2u train`).

python recipes/train.py --recipe noisy_reweighting --max_steps 20
"""

from hf_fg2u.recipe import main, parse_args

if __name__ == "__main__":
    main(*parse_args())
