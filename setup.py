"""Package layout that pyproject.toml cannot express alone: kernels/ installs as `megacoca_kernels`.

A top-level import named `kernels` would shadow the unrelated `kernels` package other libraries import.
"""

from setuptools import find_packages, setup

kernel_packages = ["megacoca_kernels"] + [
    "megacoca_kernels." + name for name in find_packages(where="kernels")
]

setup(
    packages=find_packages(include=["megacoca", "megacoca.*"]) + kernel_packages,
    package_dir={"megacoca": "megacoca", "megacoca_kernels": "kernels"},
)
