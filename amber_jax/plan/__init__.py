"""The plan: per-site data next to params (``plan.schema``: SparsityPlan and its field table),
its W8A8 part, channel orders, coverage, orbax I/O and sharding, all derived from the sites an
architecture declares. Imports only ``amber_jax.core`` and ``amber_jax.io`` below it."""
