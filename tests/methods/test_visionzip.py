"""VisionZip against a loop reference of its dominant + contextual rule (Yang et al.,
"VisionZip: Longer is Better but Not Necessary in Vision Language Models", arXiv 2412.04467)."""

import pytest
import torch

from tests.reference import cosine
from vllm_vtprune.methods.visionzip import select, split_budget


def reference(hidden, cls_attn_heads, keys, dominant, contextual, keep_cls):
    h = hidden.double().tolist()
    kk = keys.double().tolist()
    n = len(h)
    scores = [sum(cls_attn_heads[hh][j].item() for hh in range(len(cls_attn_heads))) for j in range(n)]
    patches = list(range(1, n))
    n_dom = dominant - 1 if keep_cls else dominant
    ranked = sorted(patches, key=lambda j: (-scores[j], j))[:n_dom]
    dom = ([0] if keep_cls else []) + sorted(ranked)
    rest = [j for j in patches if j not in dom]
    out = [h[j] for j in dom]
    if contextual:
        step = max(1, len(rest) // contextual)
        targets = list(range(0, len(rest), step))[:contextual]
        groups = {t: [] for t in targets}
        for pos, j in enumerate(rest):
            if pos in targets:
                continue
            sims = [cosine(kk[j], kk[rest[t]]) for t in targets]
            best = max(range(len(targets)), key=lambda q: (sims[q], -q))
            groups[targets[best]].append(j)
        for t in targets:
            members = groups[t]
            mean = [sum(h[m][c] for m in members) / max(len(members), 1) for c in range(len(h[0]))]
            out.append([h[rest[t]][c] + mean[c] for c in range(len(h[0]))])
    return torch.tensor(out, dtype=torch.float64), dom


def _inputs(n=37, c=6, heads=3, dk=5):
    hidden = torch.randn(n, c)
    attn = torch.softmax(torch.randn(heads, n), dim=-1)
    keys = torch.randn(n, dk)
    return hidden, attn, keys


def test_split_budget_presets_and_proportional():
    assert split_budget(64) == (54, 10)
    assert split_budget(128) == (108, 20)
    assert split_budget(192) == (162, 30)
    assert split_budget(32) == (27, 5)
    assert split_budget(1) == (1, 0)
    assert split_budget(20, contextual=4) == (16, 4)
    assert sum(split_budget(100)) == 100


@pytest.mark.parametrize("keep_cls", [False, True])
@pytest.mark.parametrize("budget,ctx", [(12, 3), (8, 0), (20, 5)])
def test_matches_reference(keep_cls, budget, ctx):
    hidden, attn, keys = _inputs()
    out, dom = select(hidden, attn, keys, budget, keep_cls=keep_cls, contextual=ctx)
    ref, ref_dom = reference(hidden, attn, keys, budget - ctx, ctx, keep_cls)
    assert dom.tolist() == ref_dom
    assert out.shape == (budget, hidden.shape[1])
    assert torch.allclose(out.double(), ref, atol=1e-5)


def test_cls_first_when_kept():
    hidden, attn, keys = _inputs()
    out, dom = select(hidden, attn, keys, 10, keep_cls=True)
    assert dom[0] == 0 and torch.equal(out[0], hidden[0])
    _, dom2 = select(hidden, attn, keys, 10, keep_cls=False)
    assert 0 not in dom2.tolist()


def test_summed_and_patch_only_attention_agree():
    hidden, attn, keys = _inputs()
    a, _ = select(hidden, attn, keys, 12)
    b, _ = select(hidden, attn.sum(0), keys, 12)
    c, _ = select(hidden, attn.sum(0)[1:], keys, 12)
    assert torch.allclose(a, b) and torch.allclose(a, c)


def test_budget_at_least_all_tokens():
    hidden, attn, keys = _inputs(n=6)
    out, _ = select(hidden, attn, keys, 50)
    assert out.shape[0] == 5
    assert sorted(map(tuple, out.tolist())) == sorted(map(tuple, hidden[1:].tolist()))
    out, _ = select(hidden, attn, keys, 50, keep_cls=True)
    assert out.shape[0] == 6


def test_adversarial_zero_keys_duplicates_single_patch():
    hidden, attn, keys = _inputs(n=15)
    keys[3:6] = 0.0
    hidden[7] = hidden[8]
    keys[7] = keys[8]
    attn[:, 7] = attn[:, 8]
    out, dom = select(hidden, attn, keys, 8, contextual=3)
    ref, ref_dom = reference(hidden, attn, keys, 5, 3, False)
    assert dom.tolist() == ref_dom and torch.allclose(out.double(), ref, atol=1e-5)
    h1, a1, k1 = _inputs(n=2)
    assert select(h1, a1, k1, 1)[0].shape == (1, 6)
    assert select(h1, a1, k1, 1, keep_cls=True)[1].tolist() == [0]


def test_deterministic_and_dtype():
    hidden, attn, keys = _inputs()
    for dtype in (torch.float16, torch.bfloat16):
        out, dom = select(hidden.to(dtype), attn.to(dtype), keys.to(dtype), 12, contextual=3)
        ref, ref_dom = reference(hidden.to(dtype).float(), attn.to(dtype).float(), keys.to(dtype).float(), 9, 3, False)
        assert out.dtype == dtype and dom.tolist() == ref_dom
        assert torch.allclose(out.double(), ref, atol=5e-2)
    a, _ = select(hidden, attn, keys, 12)
    b, _ = select(hidden.clone(), attn.clone(), keys.clone(), 12)
    assert torch.equal(a, b)


def test_non_finite_and_bad_shapes_raise():
    hidden, attn, keys = _inputs()
    bad = hidden.clone()
    bad[2, 2] = float("nan")
    with pytest.raises(ValueError):
        select(bad, attn, keys, 8)
    bad_attn = attn.clone()
    bad_attn[0, 3] = float("inf")
    with pytest.raises(ValueError):
        select(hidden, bad_attn, keys, 8)
    with pytest.raises(ValueError):
        select(hidden, attn[:, :5], keys, 8)
    with pytest.raises(ValueError):
        select(hidden, attn, keys[:5], 8)
