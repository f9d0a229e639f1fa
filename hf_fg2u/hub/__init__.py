"""What leaves a run: the model card, loading a run back (``load_run``), and the weights report."""
