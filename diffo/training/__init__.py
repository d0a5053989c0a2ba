"""Training of DiffO models: `python -m diffo train` (see train.py)."""
