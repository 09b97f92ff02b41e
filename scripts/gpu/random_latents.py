"""Random cached token pyramids for timing `maskar train` without a dataset or tokenizer pass.

2048 samples of the 256 px VQ-VAE schedule (64 steps of batch 32) written as a latents store:
    python3 scripts/gpu/random_latents.py /tmp/lat256
then `maskar train ... data.name=latents data.root=/tmp/lat256`.
"""

import sys

import torch

from maskar.data.latent_store import write_latents
from maskar.tokenizers.vqvae import PATCH_NUMS


def batches(generator: torch.Generator):
    for _ in range(8):
        d = {f"indices_{i}": torch.randint(0, 4096, (256, pn, pn), generator=generator, dtype=torch.int32)
             for i, pn in enumerate(PATCH_NUMS[256])}  # fmt: skip
        d["label"] = torch.randint(0, 1000, (256,), generator=generator)
        yield d


if __name__ == "__main__":
    write_latents(sys.argv[1], batches(torch.Generator().manual_seed(0)), num_classes=1000)
