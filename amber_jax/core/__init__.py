"""Pure maths of a site (no model imports): N:M patterns, scores, masks, int8 quantization,
output corrections, the architecture's site declaration type, matmul backends and the
composable site linear (``core.linear``), and dot_generals for other Flax code."""
