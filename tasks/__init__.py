"""Prefect tasks: thin wrappers around so8t_core that move references, not arrays.

Each module is one pipeline stage; each task owns its retry policy. Deterministic
failures (a bad checkpoint, a failed validation) are never retried; storage and
network errors are.
"""
