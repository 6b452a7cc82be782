"""Training: one loop for CE training and distillation (`loop.py`), its options (`cli.py`), building models and
data from them (`setup.py`), checkpoints (`state.py`) and metrics (`metrics.py`)."""
