"""Test helpers: tiny models and data, a stand-in Hub, scripts each rank of a multi-process test runs."""
