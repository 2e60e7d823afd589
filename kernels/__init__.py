"""cmoe.kernels — fused Triton kernels for token-level expert dispatch (planned: issue "Fused Triton kernels").

Not implemented yet: importing this package registers no backend. Until it does, ``backend="triton"``
raises a clear error, and ``backend="auto"`` uses ``sorted`` (on CUDA: ``dense`` for dense routing).
"""
