"""Run the Triton kernels on CPU through Triton's interpreter when there is no GPU.

TRITON_INTERPRET is read when `triton.jit` decorates a kernel, so it is set here, before any test module
imports glmserve.kernels (the library never imports its kernels at `import glmserve.engine`).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
