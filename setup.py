"""Builds the shim's cffi extension (API mode); everything else is in pyproject.toml."""
from setuptools import setup

setup(cffi_modules=["ffi/build_shim.py:ffibuilder"])
