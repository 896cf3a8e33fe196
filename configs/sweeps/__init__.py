"""Sweep files: each defines get_sweep() (t5g2/sweep/spec.py); run with python -m launch.sweep."""
