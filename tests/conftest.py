"""Shared pytest setup.

The Triton kernels run on CPU through Triton's interpreter: ``TRITON_INTERPRET`` must be set
before any module defining ``@triton.jit`` kernels is imported (``triton.jit`` reads it at
decoration time), hence at the top of this file.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"
