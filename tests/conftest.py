"""Test-session settings shared by every test module."""
import torch
from hypothesis import settings

# Tiny tensors: one thread avoids oversubscribing a shared CPU (2-50x faster here) and keeps
# every matmul's summation order fixed from run to run.
torch.set_num_threads(1)

# Property tests are seeded like the rest: the same examples on every run and machine.
settings.register_profile("lorakit", derandomize=True, print_blob=True)
settings.load_profile("lorakit")
