"""Reinforcement learning for reasoning: advantages (`polmjax.rl.advantages`), rewards and verifiers
(`polmjax.rl.rewards`).

Import the submodules directly. This package imports nothing itself, so the verifier worker
processes, which unpickle reward functions from `polmjax.rl.rewards`, start without loading JAX.
"""
