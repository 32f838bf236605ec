"""Triton ResPrune kernel against the torch path on the CPU: in Triton's interpreter, or
compiled on the GPU with ``VTPRUNE_TEST_DEVICE=cuda`` (tests/kernels/conftest.py).

The torch path itself is checked against a float64 lstsq reference in
tests/methods/test_resprune.py; here the kernel must reproduce its picks (in order)
exactly on fp32 inputs, also when the picks exhaust the tokens' span and new rounds
start (restart rule), and up to ties on fp16/bf16.
"""

import pytest
import torch
import triton  # noqa: F401  -- a missing triton must fail these tests, not skip them

from tests.kernels.conftest import DEVICE
from tests.reference import assert_resprune_order_up_to_ties, resprune_reference_order
from vllm_vtprune import kernels
from vllm_vtprune.kernels import resprune as kdispatch
from vllm_vtprune.methods import resprune


def on_device(x, texts):
    return x.to(DEVICE), [t.to(DEVICE) if t is not None else None for t in texts]


def kernel_orders(x, k, texts, alpha, seeds, **kw):
    """The kernel's picks for CPU inputs, run on the test device, back on the CPU."""
    if isinstance(texts, torch.Tensor):
        texts = [texts] * x.shape[0]
    x, texts = on_device(x, texts)
    return kernels.resprune_order_batch(x, k, texts, alpha, seeds, **kw).cpu()


def torch_orders(x, k, texts, alpha, seeds):
    return [
        resprune.select_order(x[b], k, texts[b], alpha, seeds[b]).tolist()
        for b in range(x.shape[0])
    ]


@pytest.mark.parametrize(
    "b,n,d,k,block",
    [
        (2, 37, 24, 20, 16),  # N not a multiple of the block, several blocks
        (1, 37, 24, 37, 16),  # K = N
        (3, 50, 32, 1, 16),  # K = 1
        (2, 64, 40, 30, 64),  # exact multiple, single block
        (1, 300, 16, 40, 128),  # K > D: rank exhaustion -> restarts (new rounds)
        (2, 40, 8, 37, 16),  # K close to N, N > D: several rounds
    ],
)
@pytest.mark.parametrize("use_text", [False, True])
@pytest.mark.parametrize("persistent", [False, True])
def test_kernel_matches_torch_fp32(b, n, d, k, block, use_text, persistent):
    gen = torch.Generator().manual_seed(b * 7919 + n * 31 + k + use_text)
    x = torch.randn(b, n, d, generator=gen) * (0.5 + torch.rand(b, n, 1, generator=gen))
    texts = [torch.randn(3, d, generator=gen) if use_text else None for _ in range(b)]
    seeds = [None if i % 2 == 0 else (n // 3) for i in range(b)]
    got = kernel_orders(x, k, texts, 0.75, seeds, block=block, persistent=persistent)
    assert got.dtype == torch.int64 and got.shape == (b, min(k, n))
    assert got.tolist() == torch_orders(x, k, texts, 0.75, seeds)


def check_kernel(x, k, texts, seeds, block, persistent, alpha=0.75):
    """Kernel picks == torch picks (in order) == float64 reference; returns them."""
    got = kernel_orders(x, k, texts, alpha, seeds, block=block, persistent=persistent).tolist()
    assert got == torch_orders(x, k, texts, alpha, seeds)
    for b in range(x.shape[0]):
        assert got[b] == resprune_reference_order(x[b], k, texts[b], alpha, seeds[b])
    return got


@pytest.mark.parametrize("persistent", [False, True])
def test_kernel_low_rank_new_rounds(persistent):
    # 20 tokens of rank 5, budget 12: rounds of 5, 5 and 2 picks; one text-gated image,
    # one with an explicit seed, so the round starts differ between the images
    gen = torch.Generator().manual_seed(15)
    x = torch.randn(3, 20, 5, generator=gen) @ torch.randn(3, 5, 24, generator=gen)
    texts = [None, torch.randn(2, 24, generator=gen), None]
    got = check_kernel(x, 12, texts, [None, None, 7], 8, persistent)
    perm = torch.randperm(20, generator=gen)  # the tail follows the tokens, not positions
    back = check_kernel(x[:1, perm], 12, [None], [None], 8, persistent)[0]
    assert [int(perm[i]) for i in back] == got[0]


@pytest.mark.parametrize("persistent", [False, True])
def test_kernel_duplicates_zeros_collinear(persistent):
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(9, 12, generator=gen)
    x = torch.cat(
        [base, base[:4], torch.zeros(3, 12), 2.0 * base[5:7], -base[1:2], base[2:3]]
    )  # 20 tokens: duplicates, zeros, multiples
    x = x.unsqueeze(0)
    for k in (1, 9, 14, 21, 30):
        got = check_kernel(x, k, [None], [None], 8, persistent)
        assert len(set(got[0])) == min(k, x.shape[1])
    assert got[0][-3:] == [13, 14, 15]  # only zero vectors left: restart, lowest index
    # one direction: every step restarts, so the picks go by norm (ties: lowest index)
    v = torch.randn(12, generator=gen)
    coll = torch.stack([c * v for c in [1.0, -2.0, 0.5, 3.0, 3.0, 1.0, 0.0]]).unsqueeze(0)
    assert check_kernel(coll, 7, [None], [None], 4, persistent)[0] == [3, 4, 1, 0, 5, 2, 6]
    allsame = v.repeat(10, 1).unsqueeze(0)  # all tied on every restart -> lowest index
    assert check_kernel(allsame, 10, [None], [None], 4, persistent)[0] == list(range(10))
    z = torch.zeros(1, 6, 5)
    assert check_kernel(z, 4, [None], [None], 4, persistent)[0] == [0, 1, 2, 3]


@pytest.mark.parametrize("persistent", [False, True])
def test_kernel_restart_gate_then_ungated_fallback(persistent):
    e = torch.eye(4)
    x = torch.stack([-e[0], -2 * e[0], 0.5 * e[0], -3 * e[0]]).unsqueeze(0)
    got = check_kernel(x, 4, [e[:1]], [None], 2, persistent)
    assert got[0] == [3, 2, 1, 0]  # positive gate first, then by ungated energy


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("persistent", [False, True])
def test_kernel_half_inputs_same_set_up_to_ties(dtype, persistent):
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(2, 45, 32, generator=gen).to(dtype)
    t = torch.randn(2, 32, generator=gen).to(dtype)
    got = kernel_orders(x, 15, t, 0.3, None, block=16, persistent=persistent)
    for b in range(2):
        ref = resprune.select_order(x[b], 15, t, 0.3).tolist()
        if sorted(got[b].tolist()) != sorted(ref):
            assert_resprune_order_up_to_ties(
                x[b].float(), got[b].tolist(), t.float(), 0.3, rel=1e-3
            )


def test_checker_can_fail():
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(20, 16, generator=gen)
    good = resprune.select_order(x, 6).tolist()
    assert_resprune_order_up_to_ties(x, good, rel=1e-3)
    bad = good[:2] + [i for i in range(20) if i not in good][:4]
    with pytest.raises(AssertionError):
        assert_resprune_order_up_to_ties(x, bad, rel=1e-3)


def test_dispatch_env(monkeypatch):
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(30, 16, generator=gen)
    t = torch.randn(2, 16, generator=gen)
    want = resprune.select(x, 8, t, 0.75, 3)
    x, (t,) = on_device(x, [t])
    calls = []
    real = kdispatch.resprune_order_batch

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(kdispatch, "resprune_order_batch", spy)
    monkeypatch.setenv("VTPRUNE_KERNELS", "torch")
    assert kernels.resprune_select(x, 8, t, 0.75, 3).tolist() == want.tolist()
    assert calls == []
    monkeypatch.setenv("VTPRUNE_KERNELS", "auto")  # CPU tensor -> torch path, CUDA -> kernel
    assert kernels.resprune_select(x, 8, t, 0.75, 3).tolist() == want.tolist()
    assert calls == ([] if DEVICE == "cpu" else [1])
    calls.clear()
    monkeypatch.setenv("VTPRUNE_KERNELS", "triton")
    assert kernels.resprune_select(x, 8, t, 0.75, 3).tolist() == want.tolist()
    assert calls == [1]
    xb = torch.stack([x, x.flip(0)])
    out = kernels.resprune_select_batch(xb, 8, t, 0.75, [3, None])
    assert calls == [1, 1]
    assert out.tolist() == resprune.select_batch(xb.cpu(), 8, t.cpu(), 0.75, [3, None]).tolist()
    monkeypatch.setenv("VTPRUNE_KERNELS", "cuda-please")
    with pytest.raises(ValueError):
        kernels.resprune_select(x, 8)


def test_kernel_path_validates(monkeypatch):
    monkeypatch.setenv("VTPRUNE_KERNELS", "triton")
    x = torch.randn(10, 8)
    x[2, 3] = float("nan")
    with pytest.raises(ValueError):
        kernels.resprune_select(x.to(DEVICE), 3)
    with pytest.raises(ValueError):
        kernels.resprune_select(torch.randn(10, 8).to(DEVICE), 3, seed=10)
    assert kernels.resprune_select(torch.randn(1, 8).to(DEVICE), 5).tolist() == [0]
