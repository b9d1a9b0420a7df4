"""Attention computations on plain tensors (floor 2): the PyTorch reference / CPU path, later the Triton kernels."""
