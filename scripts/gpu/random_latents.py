"""Random cached token pyramids for timing `maskar train` without a dataset or tokenizer pass.

2048 samples of the VQ-VAE schedule at RES px (default 256; 1024 for issue 13's 1024 px runs)
written as a latents store:
    python3 scripts/gpu/random_latents.py /tmp/lat256 [RES] [SAMPLES]
then `maskar train ... data.name=latents data.root=/tmp/lat256` (at another resolution, also
`model.tokenizer.resolution=RES model.tokenizer.patch_nums=[...] data.resolution=RES`).
"""

import sys

import torch

from maskar.data.latent_store import write_latents
from maskar.tokenizers.vqvae import PATCH_NUMS


def batches(generator: torch.Generator, res: int, samples: int):
    chunk = 256
    for start in range(0, samples, chunk):
        n = min(chunk, samples - start)
        d = {f"indices_{i}": torch.randint(0, 4096, (n, pn, pn), generator=generator, dtype=torch.int32)
             for i, pn in enumerate(PATCH_NUMS[res])}  # fmt: skip
        d["label"] = torch.randint(0, 1000, (n,), generator=generator)
        yield d


if __name__ == "__main__":
    res = int(sys.argv[2]) if len(sys.argv) > 2 else 256
    samples = int(sys.argv[3]) if len(sys.argv) > 3 else 2048
    if res not in PATCH_NUMS:
        sys.exit(f"random_latents: RES: expected one of {sorted(PATCH_NUMS)}, got {res}")
    write_latents(sys.argv[1], batches(torch.Generator().manual_seed(0), res, samples), num_classes=1000)
