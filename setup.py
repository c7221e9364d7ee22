"""Build tcpmon: the Python package, its Cython extensions and the BPF object."""
import os
import subprocess

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
BPF_OBJECT = os.path.join("tcpmon", "data", "tcpconnect.bpf.o")
INCLUDE_DIRS = ["bpf", "ext"]


class BuildWithBpfObject(build_py):
    """Builds the host's BPF object into the package when it is not there yet."""

    def run(self):
        if not os.path.exists(os.path.join(HERE, BPF_OBJECT)):
            subprocess.check_call(["make", "-C", HERE, "bpf"])
        super().run()


extensions = [
    Extension("tcpmon._abi", ["ext/_abi.pyx"], include_dirs=INCLUDE_DIRS),
    Extension("tcpmon._maps", ["ext/_maps.pyx"], include_dirs=INCLUDE_DIRS),
    Extension("tcpmon._render", ["ext/_render.pyx"], include_dirs=INCLUDE_DIRS),
    Extension("tcpmon._libbpf", ["ext/_libbpf.pyx"], include_dirs=INCLUDE_DIRS, libraries=["bpf"]),
]

setup(
    name="tcpmon",
    version="0.1.0",
    description="eBPF exporter counting TCP connect attempts per process for Prometheus",
    license="BSD-2-Clause",
    python_requires=">=3.9",
    packages=["tcpmon", "tcpmon.attribution"],
    package_data={"tcpmon": ["data/*.bpf.o"]},
    ext_modules=cythonize(extensions, language_level=3),
    install_requires=["prometheus-client>=0.17", "gunicorn>=23,<28"],
    extras_require={"test": ["pytest", "pytest-benchmark", "hypothesis", "pyroute2"]},
    entry_points={"console_scripts": ["tcpmon=tcpmon.cli:main"]},
    cmdclass={"build_py": BuildWithBpfObject},
    zip_safe=False,
)
