"""Triton ResPrune kernel (interpreter mode, CPU) against the torch path.

The torch path itself is checked against a float64 lstsq reference in
tests/methods/test_resprune.py; here the kernel must reproduce its picks (in order)
exactly on fp32 inputs, and up to ties on fp16/bf16.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest
import torch
import triton  # noqa: F401  -- a missing triton must fail these tests, not skip them

from vllm_vtprune import kernels
from vllm_vtprune.kernels import resprune as kdispatch
from vllm_vtprune.methods import resprune


def torch_orders(x, k, texts, alpha, seeds):
    return [
        resprune.select_order(x[b], k, texts[b], alpha, seeds[b]).tolist()
        for b in range(x.shape[0])
    ]


def check_up_to_ties(tokens, got, text, alpha, seed, rel=1e-3):
    """Each pick is a near-argmax (float64 energies along the kernel's own picks)."""
    v = tokens.to(torch.float64)
    n = v.shape[0]
    if text is None:
        g = torch.ones(n, dtype=torch.float64)
    else:
        t = text.to(torch.float64)
        cos = (v @ t.T) / (v.norm(dim=1, keepdim=True) * t.norm(dim=1) + 1e-300)
        g = cos.max(dim=1).values.clamp_min(0) ** alpha
    assert len(set(got)) == len(got)
    for step in range(1, len(got)):
        a = v[got[:step]].T
        proj = a @ torch.linalg.lstsq(a, v.T, driver="gelsd").solution
        e = ((v.T - proj) ** 2).sum(0)
        e = torch.where(e <= 1e-4 * (v * v).sum(1), 0.0, e)
        s = g * e
        s[got[:step]] = -1
        use = s if s.max() > 0 else torch.where(s < 0, -1.0, e)
        assert use[got[step]] >= use.max() * (1 - rel), (step, got[step])


@pytest.mark.parametrize(
    "b,n,d,k,block",
    [
        (2, 37, 24, 20, 16),  # N not a multiple of the block, several blocks
        (1, 37, 24, 37, 16),  # K = N
        (3, 50, 32, 1, 16),  # K = 1
        (2, 64, 40, 30, 64),  # exact multiple, single block
        (1, 300, 16, 40, 128),  # K > D: rank exhaustion -> fallback by lowest index
    ],
)
@pytest.mark.parametrize("use_text", [False, True])
@pytest.mark.parametrize("persistent", [False, True])
def test_kernel_matches_torch_fp32(b, n, d, k, block, use_text, persistent):
    gen = torch.Generator().manual_seed(b * 7919 + n * 31 + k + use_text)
    x = torch.randn(b, n, d, generator=gen) * (0.5 + torch.rand(b, n, 1, generator=gen))
    texts = [torch.randn(3, d, generator=gen) if use_text else None for _ in range(b)]
    seeds = [None if i % 2 == 0 else (n // 3) for i in range(b)]
    got = kernels.resprune_order_batch(
        x, k, texts, 0.75, seeds, block=block, persistent=persistent
    )
    assert got.dtype == torch.int64 and got.shape == (b, min(k, n))
    assert got.tolist() == torch_orders(x, k, texts, 0.75, seeds)


@pytest.mark.parametrize("persistent", [False, True])
def test_kernel_duplicates_zeros_collinear(persistent):
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(9, 12, generator=gen)
    x = torch.cat(
        [base, base[:4], torch.zeros(3, 12), 2.0 * base[5:7], -base[1:2], base[2:3]]
    )  # 20 tokens: duplicates, zeros, multiples
    x = x.unsqueeze(0)
    for k in (1, 9, 14, 21, 30):
        got = kernels.resprune_order_batch(x, k, None, 0.75, None, block=8, persistent=persistent)
        assert got[0].tolist() == torch_orders(x, k, [None], 0.75, [None])[0]
        assert len(set(got[0].tolist())) == min(k, x.shape[1])
    allsame = torch.randn(12, generator=gen).repeat(10, 1).unsqueeze(0)
    got = kernels.resprune_order_batch(
        allsame, 10, None, 0.75, None, block=4, persistent=persistent
    )
    assert got[0].tolist() == list(range(10))  # all tied -> lowest index order
    z = torch.zeros(1, 6, 5)
    got = kernels.resprune_order_batch(z, 4, None, 0.75, None, block=4, persistent=persistent)
    assert got[0].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("persistent", [False, True])
def test_kernel_half_inputs_same_set_up_to_ties(dtype, persistent):
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(2, 45, 32, generator=gen).to(dtype)
    t = torch.randn(2, 32, generator=gen).to(dtype)
    got = kernels.resprune_order_batch(x, 15, t, 0.3, None, block=16, persistent=persistent)
    for b in range(2):
        ref = resprune.select_order(x[b], 15, t, 0.3).tolist()
        if sorted(got[b].tolist()) != sorted(ref):
            check_up_to_ties(x[b].float(), got[b].tolist(), t.float(), 0.3, None)


def test_checker_can_fail():
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(20, 16, generator=gen)
    good = resprune.select_order(x, 6).tolist()
    check_up_to_ties(x, good, None, 0.75, None)
    bad = good[:2] + [i for i in range(20) if i not in good][:4]
    with pytest.raises(AssertionError):
        check_up_to_ties(x, bad, None, 0.75, None)


def test_dispatch_env(monkeypatch):
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(30, 16, generator=gen)
    t = torch.randn(2, 16, generator=gen)
    want = resprune.select(x, 8, t, 0.75, 3)
    calls = []
    real = kdispatch.resprune_order_batch

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(kdispatch, "resprune_order_batch", spy)
    monkeypatch.setenv("VTPRUNE_KERNELS", "torch")
    assert kernels.resprune_select(x, 8, t, 0.75, 3).tolist() == want.tolist()
    assert calls == []
    monkeypatch.setenv("VTPRUNE_KERNELS", "auto")  # CPU tensor -> torch path
    assert kernels.resprune_select(x, 8, t, 0.75, 3).tolist() == want.tolist()
    assert calls == []
    monkeypatch.setenv("VTPRUNE_KERNELS", "triton")
    assert kernels.resprune_select(x, 8, t, 0.75, 3).tolist() == want.tolist()
    assert calls == [1]
    xb = torch.stack([x, x.flip(0)])
    out = kernels.resprune_select_batch(xb, 8, t, 0.75, [3, None])
    assert calls == [1, 1]
    assert out.tolist() == resprune.select_batch(xb, 8, t, 0.75, [3, None]).tolist()
    monkeypatch.setenv("VTPRUNE_KERNELS", "cuda-please")
    with pytest.raises(ValueError):
        kernels.resprune_select(x, 8)


def test_kernel_path_validates(monkeypatch):
    monkeypatch.setenv("VTPRUNE_KERNELS", "triton")
    x = torch.randn(10, 8)
    x[2, 3] = float("nan")
    with pytest.raises(ValueError):
        kernels.resprune_select(x, 3)
    with pytest.raises(ValueError):
        kernels.resprune_select(torch.randn(10, 8), 3, seed=10)
    assert kernels.resprune_select(torch.randn(1, 8), 5).tolist() == [0]
