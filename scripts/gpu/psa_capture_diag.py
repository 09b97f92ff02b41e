"""Which form of fwd + bwd (``torch.autograd.grad``) captures in a CUDA graph, for SDPA and the
PSA kernel: the gradient seed cloned inside the capture, the leaves made on the capture stream,
both. One case per process (a failed capture leaves the process's CUDA state unusable):

    for i in 0 1 2 3 4 5; do PYTHONPATH=$PWD python3 scripts/gpu/psa_capture_diag.py $i; done

On an H200 (torch 2.11, 2026-12-05) only the forms with the leaves on the capture stream captured
(docs/benchmarks.md, *Runs 4-7*)."""

import sys

import torch

import maskar.kernels.neighborhood as nb

nb.FORCE_FWD_CONFIG = nb._fwd_candidates(64)[0]
nb.FORCE_BWD_CONFIG = nb._bwd_candidates(64)[0]
B, H, L, D = 4, 4, 256, 64
side = torch.cuda.Stream()


def make(seed_inside: bool, psa: bool):
    ls = [torch.randn(B, L, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    q, k, v = (x.transpose(1, 2) for x in ls)
    dout = torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16)

    def fn():
        o = (
            nb.neighborhood_attention(q, k, v, (16, 16), 7, 1)
            if psa
            else torch.nn.functional.scaled_dot_product_attention(q, k, v)
        )
        return torch.autograd.grad(o, ls, dout.clone() if seed_inside else dout)

    return fn


CASES = [
    ("sdpa, seed cloned inside", True, False, False),
    ("sdpa, leaves on the capture stream", False, True, False),
    ("sdpa, both", True, True, False),
    ("psa, seed cloned inside", True, False, True),
    ("psa, leaves on the capture stream", False, True, True),
    ("psa, both", True, True, True),
]
for name, seed_inside, on_side, psa in [CASES[int(sys.argv[1])]]:
    try:
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn = make(seed_inside, psa) if on_side else None
        if fn is None:
            fn = make(seed_inside, psa)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=side if on_side else None, capture_error_mode="thread_local"):
            fn()
        g.replay()
        torch.cuda.synchronize()
        print(name, "OK", flush=True)
    except Exception as e:
        print(name, "FAILED", type(e).__name__, str(e).splitlines()[0][:200], flush=True)
