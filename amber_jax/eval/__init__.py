"""Evaluation: perplexity (multiple choice and generation build on the same forward pass)."""
