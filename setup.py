# The C part of shmray: the object store, compiled by cffi (see src/shmray/_store_build.py).
# Everything else about the package is declared in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["src/shmray/_store_build.py:ffibuilder"])
