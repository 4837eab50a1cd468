#!/usr/bin/env python
"""GPU check of training/flat_adamw.py: the torch.compile'd fused AdamW kernel against the eager
expression (same arithmetic) and its memory bandwidth on a 64M-element bucket shard, next to
torch's fused AdamW + a separate bf16 copy on the same elements. Exit 1 if the results differ.

    python benchmarks/check_flat_adamw.py                                    # GPU
    python benchmarks/check_flat_adamw.py --device cpu --elements 100000     # CPU smoke test
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from megatron_eagle.training.flat_adamw import _kernel, adamw_update, pack_groups  # noqa: E402


def _time_ms(fn, dev: torch.device, reps: int = 10) -> float:
    """Mean milliseconds of ``fn()`` after 3 warm-up calls (CUDA events on a GPU)."""
    for _ in range(3):
        fn()
    if dev.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) * 1e3 / reps
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        fn()
    e.record()
    e.synchronize()
    return s.elapsed_time(e) / reps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--elements", type=int, default=64 * 2 ** 20, help="bucket shard size (at least 400)")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    n = args.elements
    g = torch.Generator(device=dev).manual_seed(0)
    master = torch.randn(n, device=dev, generator=g)
    grad = torch.randn(n, device=dev, generator=g) * 1e-3
    m = torch.randn(n, device=dev, generator=g) * 1e-3
    v = torch.rand(n, device=dev, generator=g) * 1e-6
    # 400 runs alternating decay / no decay, like weights and biases/norms in buffer order
    groups = pack_groups((torch.arange(n, device=dev) // (n // 400) % 2).to(torch.uint8), 1)
    lr_wd = torch.tensor([[1e-4, 1e-4], [0.05, 0.0]], device=dev)
    scal = torch.tensor([0.7, 1 - 0.9 ** 5, (1 - 0.999 ** 5) ** 0.5], device=dev)
    state = [t.clone() for t in (master, m, v)]
    out_c, out_e = torch.empty(n, device=dev, dtype=torch.bfloat16), torch.empty(n, device=dev, dtype=torch.bfloat16)
    compiled = _kernel(1)
    eager = [t.clone() for t in state]
    compiled(*state[:1], grad, *state[1:], out_c, groups, lr_wd, scal, 0.9, 0.999, 1e-8)
    adamw_update(eager[0], grad, eager[1], eager[2], out_e, groups, lr_wd, scal, 0.9, 0.999, 1e-8, bits=1)
    ok = True
    for name, a, b in zip(("master", "exp_avg", "exp_avg_sq"), state, eager):
        rel = float((a - b).abs().max() / b.abs().max())
        ok = ok and rel < 1e-6
        print(f"{name}: max relative difference compiled vs eager {rel:.1e}")
    bf16_diff = float((out_c.float() - out_e.float()).abs().max())
    print(f"bf16 params: max abs difference {bf16_diff:.1e}")
    ok = ok and bf16_diff <= float(out_e.float().abs().max()) * 2 ** -7
    t_flat = _time_ms(lambda: compiled(*state[:1], grad, *state[1:], out_c, groups, lr_wd, scal, 0.9, 0.999, 1e-8),
                      dev)
    # torch's fused AdamW on the same elements (as 16 tensors), a clip pass and the bf16 copy
    ps = [p.requires_grad_(False) for p in master.clone().chunk(16)]
    grads = list(grad.clone().chunk(16))
    for p, gr in zip(ps, grads):
        p.grad = gr
    opt = torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.05, fused=True)
    outs = list(out_c.chunk(16))

    def torch_path():
        torch._foreach_mul_(grads, 0.7)
        opt.step()
        torch._foreach_copy_(outs, ps)

    t_torch = _time_ms(torch_path, dev)
    flat_bytes = n * 30  # read g, p, m, v (16); write p, m, v (12) + bf16 (2); + 1 bit of group
    print(f"flat fused kernel: {t_flat:.2f} ms = {flat_bytes / t_flat / 1e6:.0f} GB/s for {n / 1e6:.0f}M elements")
    print(f"torch clip + fused AdamW + bf16 copy: {t_torch:.2f} ms ({t_torch / t_flat:.2f}x the flat kernel)")
    print(f"per 1.96B parameters: flat {t_flat * 1.96e9 / n:.1f} ms, torch path {t_torch * 1.96e9 / n:.1f} ms")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
