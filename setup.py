"""Shim so `pip install -e .` works with older setuptools; metadata is in setup.cfg."""
import setuptools

setuptools.setup()
