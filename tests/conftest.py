import torch

# One intra-op thread per test process: the suite runs two processes (pytest -n 2) on two cores, and
# small ops spend more time in OpenMP hand-offs than in arithmetic when threads outnumber cores.
torch.set_num_threads(1)
