"""Shared plumbing for the labs: config/CLI, devices, data, training loop, runs, checkpoints.

Nothing in here is lesson-specific. Each module is plain PyTorch that a learner could have
written; read them when you want to know what a lab's one-line helper call does.
"""
