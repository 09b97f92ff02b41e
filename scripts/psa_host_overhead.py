"""Host time of one neighbourhood-attention call with its kernel launches stubbed out (runs on
the CPU, no GPU): what the per-call figures of `benchmarks/psa.py` pay before any kernel runs.

    python scripts/psa_host_overhead.py      # CASMAR-B's shape: B 64, H 16, 16 x 16 grid, D 64, k 7
"""

import time

import torch

import maskar.kernels.neighborhood as nb


def main() -> None:
    nb._launch = lambda *args, **kwargs: None  # the Python path up to the launcher, no kernel
    nb._device_ok = lambda device: True
    nb.FORCE_FWD_CONFIG = nb._fwd_candidates(64)[0]
    nb.FORCE_BWD_CONFIG = nb._bwd_candidates(64)[0]
    B, H, L, D = 64, 16, 256, 64
    qkv = torch.randn(B, L, 3, H, D, dtype=torch.bfloat16, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # the model's layout
    dout = torch.randn(B, H, L, D, dtype=torch.bfloat16)

    def fwd():
        return nb.neighborhood_attention(q, k, v, (16, 16), 7)

    def fwd_bwd():
        torch.autograd.grad(fwd(), (q, k, v), dout)

    for fn in (fwd, fwd_bwd):
        for _ in range(20):
            fn()
        n, t = 300, time.perf_counter()
        for _ in range(n):
            fn()
        us = (time.perf_counter() - t) / n * 1e6
        print(f"{fn.__name__}: {us:.1f} us of host time per call (launches stubbed)")


if __name__ == "__main__":
    main()
