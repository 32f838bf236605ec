import pytest
import torch

from vllm_vtprune.methods._common import check_budget, check_tokens, cosine_matrix, stable_topk


def test_check_tokens_returns_float32_copy():
    x = torch.randn(3, 4, dtype=torch.float16)
    y = check_tokens(x)
    assert y.dtype == torch.float32 and torch.equal(y, x.float())
    y[0, 0] = 100.0
    assert x[0, 0] != 100.0


@pytest.mark.parametrize(
    "bad", [torch.randn(3), torch.randn(2, 3, 4), torch.zeros(0, 4), torch.zeros(3, 0)]
)
def test_check_tokens_rejects_shapes(bad):
    with pytest.raises(ValueError):
        check_tokens(bad)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_check_tokens_rejects_non_finite(value):
    x = torch.randn(3, 4)
    x[1, 2] = value
    with pytest.raises(ValueError, match="tokens"):
        check_tokens(x)


def test_check_budget():
    assert check_budget(3) == 3
    for bad in (0, -1, 1.5, True, "3"):
        with pytest.raises(ValueError):
            check_budget(bad)


def test_cosine_zero_vector_is_zero():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    c = cosine_matrix(x)
    assert c[0, 1] == 0 and c[0, 0] == 0 and c[1, 1] == pytest.approx(1.0)


def test_stable_topk_ties_lowest_index():
    s = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.0])
    assert stable_topk(s, 2).tolist() == [1, 2]
    assert stable_topk(s, 4).tolist() == [0, 1, 2, 3]


def test_methods_import_neither_vllm_nor_transformers():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from vllm_vtprune.methods import _common, dcp, divprune, fastv, polymorphic, rcp, visionzip\n"
        "import vllm_vtprune.spec, vllm_vtprune.text\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('vllm', 'transformers')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_finite_check_takes_large_finite_values_whose_sum_overflows():
    big = torch.full((4, 3), 3e38)  # the sum is +inf; every entry is finite
    assert torch.equal(check_tokens(big), big)
    for value in (float("nan"), float("inf"), float("-inf")):
        bad = big.clone()
        bad[2, 1] = value
        with pytest.raises(ValueError, match="NaN or Inf"):
            check_tokens(bad)
