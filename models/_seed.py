"""Seeded construction that leaves the caller's global RNG untouched."""

import contextlib

import torch


@contextlib.contextmanager
def seeded(seed: int):
    # fork_rng restores the global CPU generator on exit, so building a
    # reference model never perturbs the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
