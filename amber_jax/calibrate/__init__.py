"""Calibration and planning: passes over calibration windows that measure sites and build plans."""
