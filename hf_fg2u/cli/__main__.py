"""``python -m hf_fg2u.cli``: the same as the ``hf-fg2u`` command."""

from hf_fg2u.cli.main import main

main()
