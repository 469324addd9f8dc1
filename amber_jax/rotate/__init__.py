"""Changes of basis that make N:M groups lose less: exact rotations folded into the weights
(the residual stream, per attention head, the MLP's hidden channels), an online Hadamard
transform of down's input, and channel orders from calibration. A params transform: it sits
between the loaded params and the plan (``rotate_model`` -> new params and config -> any
planner), and the dense model computes the same function (``dense_logit_gap``)."""

from amber_jax.rotate.recipe import RotatedModel, Rotation, dense_logit_gap, rotate_model

__all__ = ["Rotation", "RotatedModel", "dense_logit_gap", "rotate_model"]
