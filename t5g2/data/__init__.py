"""Data pipelines producing batches in the encoder-decoder contract (see `batch.py`)."""
