"""Data: documents -> sentencepiece ids -> UL2 denoisers -> packed batches in the encoder-decoder
contract (`packing.py`), on grain (`pipeline.py`); the same denoisers as seqio tasks
(`seqio_tasks.py`, the only module that imports TensorFlow). Nothing here imports the model."""
