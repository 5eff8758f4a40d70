"""Training: optimizer and state (state.py), pure step (step.py), mesh (sharding.py), loop."""
