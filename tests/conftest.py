import torch

# The tests run tiny models whose ops are dominated by per-op overhead: one thread is faster and
# stays fast when the machine is shared.
torch.set_num_threads(1)
