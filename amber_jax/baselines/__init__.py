"""Baselines: weight pruning (Wanda, SparseGPT) and activation thresholds (TEAL, CATS)."""
