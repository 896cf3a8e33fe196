"""Checkpoint conversion between Hugging Face (T5Gemma 2, Gemma 3) and t5g2 parameters.

The only place t5g2 touches transformers or torch, and only lazily.
"""
