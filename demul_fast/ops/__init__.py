"""The op layer: validation, backend choice, custom ops with autograd and the functional API
(docs/OPS.md). It imports the specification (reference, common) and the kernels, never the
modules built on top of it."""
