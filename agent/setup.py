"""The agent's one compiled part; everything else is declared in pyproject.toml.

``icsmon_agent._fused`` reduces a float32 layer output in one pass (see its source). It is
optional: where no C compiler is found the install still succeeds and the agent takes its
torch route, which gives the same figures at about three times the cost.
"""

import sys

from setuptools import Extension, setup

# -O3 turns on the vectoriser that the kernel is written for; MSVC has its own flags.
flags = [] if sys.platform == "win32" else ["-O3"]

setup(
    ext_modules=[
        Extension(
            "icsmon_agent._fused",
            ["icsmon_agent/_fused.c"],
            extra_compile_args=flags,
            optional=True,
        )
    ]
)
