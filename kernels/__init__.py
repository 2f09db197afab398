"""Compute kernels (placeholder; filled by the kernels work)."""
