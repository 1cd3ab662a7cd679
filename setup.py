"""Build description for pybuild: the statemesh package. The statemesh-node command is
bin/statemesh-node, installed as it is (debian/statemesh-node.install): its interpreter
flags are part of what it guarantees."""

import re
from pathlib import Path

from setuptools import find_packages, setup

VERSION = re.search(
    r'^__version__ = "([^"]+)"', Path("statemesh/__init__.py").read_text(), re.M
).group(1)

setup(
    name="statemesh-node",
    version=VERSION,
    description="Turn a contributed machine into a StateMesh node its operator cannot enter",
    license="GPL-3+",
    packages=find_packages(include=["statemesh", "statemesh.*"]),
    python_requires=">=3.10",
)
