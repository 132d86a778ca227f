"""Build of the optional compiled chain loops; everything else is declared in pyproject.toml.

``latentnlp._chain_loops`` is plain C against the Python C API (no torch or numpy headers).  It is
optional: where no C compiler is found the install goes on, and the chain kernels step with numpy.
"""

import sys

from setuptools import Extension, setup

compile_args = [] if sys.platform == "win32" else ["-O3", "-std=gnu99", "-pthread"]
link_args = [] if sys.platform == "win32" else ["-pthread"]
setup(
    ext_modules=[
        Extension(
            "latentnlp._chain_loops",
            ["latentnlp/_chain_loops.c"],
            extra_compile_args=compile_args,
            extra_link_args=link_args,
            optional=True,
        )
    ]
)
