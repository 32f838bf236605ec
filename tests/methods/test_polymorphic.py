"""Polymorphic against loop references written from Eqs. 1-12."""

import math

import pytest
import torch

from vllm_vtprune.methods import polymorphic as P


def ref_merge(x, k, knn=5):
    rows = x.double().tolist()
    n, c = len(rows), len(rows[0])
    D = [[math.sqrt(sum((rows[i][q] - rows[j][q]) ** 2 for q in range(c))) / math.sqrt(c) for j in range(n)] for i in range(n)]
    kk = min(knn, n - 1)
    rho = []
    for i in range(n):
        if kk < 1:
            rho.append(1.0)
            continue
        near = sorted(D[i][j] for j in range(n) if j != i)[:kk]
        rho.append(math.exp(-sum(v * v for v in near) / kk))
    S = []
    for i in range(n):
        denser = [D[i][j] for j in range(n) if rho[j] > rho[i]]
        delta = min(denser) if denser else max(D[i])
        S.append(rho[i] * delta)
    centers = sorted(sorted(range(n), key=lambda i: (-S[i], i))[:k])
    assign = []
    for i in range(n):
        if i in centers:
            assign.append(centers.index(i))
        else:
            assign.append(min(range(len(centers)), key=lambda q: (D[i][centers[q]], q)))
    merged = []
    for q in range(len(centers)):
        members = [i for i in range(n) if assign[i] == q]
        merged.append([sum(rows[i][d] for i in members) / len(members) for d in range(c)])
    return torch.tensor(merged, dtype=torch.float64), assign


@pytest.mark.parametrize("n,k,knn", [(30, 6, 5), (12, 12, 3), (20, 1, 5), (8, 3, 20)])
def test_density_peak_merge_matches_reference(n, k, knn):
    x = torch.randn(n, 5)
    merged, assign = P.density_peak_merge(x, k, knn=knn)
    ref, ref_assign = ref_merge(x, k, knn)
    assert assign.tolist() == ref_assign
    assert torch.allclose(merged.double(), ref, atol=1e-5)


def test_merge_adversarial_duplicates_zero_collinear_single():
    x = torch.randn(10, 4)
    x[1] = x[0]
    x[2] = x[0]
    x[3] = 0.0
    x[4] = 2.0 * x[5]
    merged, assign = P.density_peak_merge(x, 4, knn=2)
    ref, ref_assign = ref_merge(x, 4, 2)
    assert assign.tolist() == ref_assign and torch.allclose(merged.double(), ref, atol=1e-5)
    assert sorted(set(assign.tolist())) == [0, 1, 2, 3]
    same = torch.ones(5, 3)
    merged, assign = P.density_peak_merge(same, 3)
    assert sorted(set(assign.tolist())) == [0, 1, 2] and torch.allclose(merged, torch.ones(3, 3))
    m1, a1 = P.density_peak_merge(torch.randn(1, 3), 4)
    assert m1.shape == (1, 3) and a1.tolist() == [0]


def test_merge_permutation_equivariant_and_dtypes():
    x = torch.randn(20, 6)
    perm = torch.randperm(20)
    merged, _ = P.density_peak_merge(x, 5)
    merged_p, _ = P.density_peak_merge(x[perm], 5)
    key = lambda m: sorted(map(lambda r: tuple(round(v, 4) for v in r), m.tolist()))
    assert key(merged) == key(merged_p)
    for dtype in (torch.float16, torch.bfloat16):
        mh, ah = P.density_peak_merge(x.to(dtype), 5)
        ref, ref_assign = ref_merge(x.to(dtype).float(), 5)
        assert mh.dtype == dtype and ah.tolist() == ref_assign


def test_stage1_split_and_output():
    assert P.stage1_split(128) == (108, 20)
    assert P.stage1_split(1) == (1, 0)
    x = torch.randn(40, 5)
    a = torch.rand(40)
    out, retained, assign = P.stage1(x, a, 16)
    n_keep, n_merge = P.stage1_split(16)
    assert out.shape == (16, 5)
    ranked = sorted(range(40), key=lambda i: (-a[i].item(), i))[:n_keep]
    assert retained.tolist() == sorted(ranked)
    assert torch.equal(out[:n_keep], x[retained])
    rest = [i for i in range(40) if i not in ranked]
    ref, ref_assign = ref_merge(x[rest], n_merge)
    assert torch.allclose(out[n_keep:].double(), ref, atol=1e-5)
    assert [assign[i].item() for i in rest] == ref_assign
    assert all(assign[i].item() == -1 for i in retained.tolist())


def test_stage1_budget_ge_n_and_errors():
    x = torch.randn(6, 3)
    out, retained, _ = P.stage1(x, torch.rand(6), 10)
    assert torch.equal(out, x) and retained.tolist() == list(range(6))
    with pytest.raises(ValueError):
        P.stage1(x, torch.rand(5), 3)
    bad = x.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError):
        P.stage1(bad, torch.rand(6), 3)
    with pytest.raises(ValueError):
        P.density_peak_merge(torch.tensor([[float("nan"), 1.0]]), 1)


def ref_raters(v, t):
    V, T = v.double().tolist(), t.double().tolist()
    nv, nt, d = len(V), len(T), len(V[0])
    M = []
    for i in range(nv):
        logits = [sum(V[i][q] * T[j][q] for q in range(d)) / math.sqrt(d) for j in range(nt)]
        mx = max(logits)
        e = [math.exp(l - mx) for l in logits]
        M.append([x / sum(e) for x in e])
    s = [sum(M[i][j] for i in range(nv)) / nv for j in range(nt)]
    sbar = sum(s) / nt
    raters = [j for j in range(nt) if s[j] > sbar] or list(range(nt))
    return [sum(M[i][j] for j in raters) / len(raters) for i in range(nv)], raters


def test_rater_scores_match_reference():
    v, t = torch.randn(12, 8), torch.randn(6, 8)
    alpha, raters = P.rater_scores(v, t)
    ref_alpha, ref_r = ref_raters(v, t)
    assert torch.nonzero(raters).flatten().tolist() == ref_r
    assert torch.allclose(alpha.double(), torch.tensor(ref_alpha, dtype=torch.float64), atol=1e-6)
    alpha1, r1 = P.rater_scores(v, t[:1])
    assert r1.tolist() == [True] and torch.allclose(alpha1, torch.ones(12))
    ah, _ = P.rater_scores(v.half(), t.half())
    assert ah.dtype == torch.float32
    with pytest.raises(ValueError):
        P.rater_scores(v, torch.randn(3, 7))


def test_quantile_prune():
    s = torch.tensor([0.3, 0.9, 0.1, 0.9, 0.5])
    kept, pruned = P.quantile_prune(s, 3)
    assert kept.tolist() == [1, 3, 4] and pruned.tolist() == [0, 2]
    kept, pruned = P.quantile_prune(torch.zeros(4), 2)
    assert kept.tolist() == [0, 1]
    kept, pruned = P.quantile_prune(s, 10)
    assert kept.tolist() == [0, 1, 2, 3, 4] and pruned.numel() == 0
    r = torch.rand(50)
    kept, _ = P.quantile_prune(r, 20)
    assert r[kept].min() >= r[torch.tensor([i for i in range(50) if i not in kept.tolist()])].max()
    with pytest.raises(ValueError):
        P.quantile_prune(torch.tensor([1.0, float("nan")]), 1)


def test_stage2_schedule_average_matches_budget():
    counts = P.stage2_schedule(128, 64)
    spans = [4, 9, 16]
    avg = (3 * 128 + sum(c * w for c, w in zip(counts, spans))) / 32
    assert abs(avg - 64) <= 1 and counts == sorted(counts, reverse=True)
    assert P.stage2_schedule(50, 64) == [50, 50, 50]
    with pytest.raises(ValueError):
        P.stage2_schedule(128, 64, layers=(7, 3))


def test_squared_distance_matches_explicit_differences_and_is_zero_for_equal_tokens():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(30, 16, generator=gen) * 10
    x[7] = x[3]
    want = ((x.double()[:, None] - x.double()[None]) ** 2).sum(-1)
    got = P.squared_distance(x)
    assert got.dtype == torch.float64
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-9)
    assert got[3, 7] == 0 and got[7, 3] == 0 and torch.all(got.diagonal() == 0)
    # the floor sits between float64 round-off and float32 differences that matter: tokens
    # 1e-5 of their norm apart stay apart, tokens one last bit apart count as equal
    y = x[:2].clone()
    y[1] = y[0] * (1 + 1e-5)
    assert P.squared_distance(y)[0, 1] > 0
    y[1] = y[0]
    y[1, 0] = torch.nextafter(y[0, 0], torch.tensor(1e9))
    assert P.squared_distance(y)[0, 1] == 0
