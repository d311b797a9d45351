"""instar.kernels"""
