"""Whole jobs behind the experiment scripts: frozen config in, results dict out."""
