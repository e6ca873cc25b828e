"""Where the kernels can run."""
import os

import torch

# Triton's interpreter runs kernels on the CPU (slowly, with numpy): for tests on machines without a GPU.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def runs_on(device) -> bool:
    """Whether the kernels can run on `device`: a CUDA GPU, or the CPU under TRITON_INTERPRET=1."""
    return torch.device(device).type == "cuda" or INTERPRET
