"""The ``hf-fg2u`` command: entry point, parser, launch under accelerate, data loading, the recipe registry."""
