"""Imported once by the test suite's fork server (conftest.run_script): the imports a run of the tiny
model needs, done before the runs are forked. transformers imports most of its model code lazily, on
first use, so one tiny model is built and dropped too.

The runs get one thread, like the tests (conftest.one_thread). The server itself never runs a parallel
operation: a process forked after torch has started its OpenMP threads hangs at its first one.
A stage module that fails to import is left to the run that needs it, which then reports the error."""
import contextlib

import torch

import models
import r2rank  # noqa: F401

for stage in ("evaluate", "sft"):
    with contextlib.suppress(Exception):
        __import__(stage)

torch.set_num_threads(1)
models.build_tiny()
