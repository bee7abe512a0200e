"""Moved: the class-sharded step is ``demul_fast.sharded`` (a module), the process plumbing
``demul_fast.app.processes``. This stub keeps the old names for one release
(``demul_fast._moved``)."""

from ._moved import forward

__getattr__, __dir__ = forward(__name__, {
    "demul_fast.sharded": ("shard_bounds", "gather_class_features", "ShardedDeMul"),
    "demul_fast.app.processes": ("is_main", "world_size", "Process", "init_from_env"),
})
