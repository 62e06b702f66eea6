import pytest
import torch

from vqdiff.models.vqvae import GumbelVQVAE
from vqdiff.io.tokenizer import save_tokenizer

# One intra-op thread per test process: the suite runs two processes (pytest -n 2) on two cores, and
# small ops spend more time in OpenMP hand-offs than in arithmetic when threads outnumber cores.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A random tiny tokenizer: 32 px -> 8x8 tokens over 16 codes of 16 channels (its quality is irrelevant)."""
    torch.manual_seed(0)
    tokenizer = GumbelVQVAE(resolution=32, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(),
                            z_channels=16, embedding_dim=16, num_embeddings=16, norm_groups=8)
    return save_tokenizer(tokenizer, tmp_path_factory.mktemp("tok") / "tokenizer")
