"""``python -m demul_fast``: print which backends can run here, and why not."""

from .ops.backends import describe

print(describe())
