"""The Trainer side: BilevelConfig, BilevelTrainer and what it needs around the engine (inner-state lifecycle,
safeguards, checkpoint I/O and the run lock, the process policy), and the weighted fine-tune trainer."""
