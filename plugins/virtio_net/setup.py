"""The native data path is compiled at install time (build_native.py)."""
from setuptools import setup

setup(cffi_modules=["build_native.py:ffibuilder"])
