"""Training: loss, train state, steps and loop."""
