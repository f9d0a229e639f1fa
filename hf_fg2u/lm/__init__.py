"""Language-model plumbing: per-example losses as pure functions of parameter dicts, dataset formats and their
checks, the padding collator, task metrics, and the built-in toy data of `hf-fg2u demo`."""
