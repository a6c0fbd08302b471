"""Shared pieces of hvframe's fuzz targets (see fuzz/README.md).

Nothing here imports atheris: every target's ``one_input(data)`` runs as plain Python, so the
smoke test and a reproduction of a saved finding need only hvframe itself. ``runner`` is the
one module that drives atheris, and it imports hvframe (through the target) only inside
``atheris.instrument_imports()`` so that hvframe's code is what libFuzzer sees as coverage.
"""
