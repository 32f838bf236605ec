import dataclasses

import pytest

from vllm_vtprune.spec import METHODS, PruneSpec, parse


def test_simple_int_budget():
    s = parse("resprune:128")
    assert s == PruneSpec("resprune", 128, ())
    assert str(s) == "resprune:128"
    assert s.tokens_for(576) == 128 and s.tokens_for(100) == 100


def test_ratio_budget():
    s = parse("dcp:0.25")
    assert s.budget == 0.25 and isinstance(s.budget, float)
    assert s.tokens_for(576) == 144
    assert s.tokens_for(2) == 1  # round(0.5) == 0, floored at 1
    assert parse("dcp:0.001").tokens_for(10) == 1
    assert parse("fastv:1.0").tokens_for(7) == 7
    assert parse("fastv:.5").budget == 0.5


def test_options_typed_sorted_and_round_trip():
    s = parse("resprune:64,seed=norm,alpha=0.3")
    assert s.options == (("alpha", 0.3), ("seed", "norm"))
    assert s.option("alpha") == 0.3 and s.option("missing", 7) == 7
    assert str(s) == "resprune:64,alpha=0.3,seed=norm"
    assert parse(str(s)) == s
    for text in ["dcp:16,delta=0.1,kn=5,tau=10", "polymorphic:0.5,knn=7",
                 "rcp:64,ckpt=/tmp/x.pt,layers=2-14-26", "fastv:192,layer=2",
                 "visionzip:64,contextual=10", "divprune:32"]:
        s = parse(text)
        assert parse(str(s)) == s
    assert parse("dcp:16,kn=5").option("kn") == 5
    assert parse("dcp:16,tau=10").option("tau") == 10.0


def test_frozen():
    s = parse("fastv:3")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.budget = 4


@pytest.mark.parametrize("text", [None, "none", "NONE", " none "])
def test_none_means_no_pruning(text):
    assert parse(text) is None


@pytest.mark.parametrize("text", ["", "  "])
def test_empty_spec_is_an_error_that_names_none(text):
    with pytest.raises(ValueError, match="empty spec") as err:
        parse(text)
    assert "none to turn pruning off" in str(err.value)


def test_option_a_method_does_not_have_is_refused():
    # divprune has no layers: they would be silently ignored
    with pytest.raises(ValueError, match="unknown option 'layers' for method 'divprune'"):
        parse("divprune:64,layers=3-7-16")
    assert parse("polymorphic:64,layers=3-7-16").value("layers") == "3-7-16"  # stage 2


def test_declared_defaults_and_text_conditioning():
    assert parse("resprune:8").value("alpha") == 0.75
    assert parse("resprune:8,alpha=0.3").value("alpha") == 0.3
    assert parse("resprune:8").text_conditioned
    assert not parse("resprune:8,alpha=0").text_conditioned
    assert parse("dcp:8").text_conditioned and not parse("divprune:8").text_conditioned


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("foo:12", "unknown method 'foo'"),
        ("resprune", "missing budget"),
        ("resprune:0", "bad budget '0'"),
        ("resprune:-3", "bad budget"),
        ("resprune:1.5", "bad budget '1.5'"),
        ("resprune:0.0", "bad budget"),
        ("resprune:abc", "bad budget"),
        ("resprune:1e2", "bad budget"),
        ("resprune:12,beta=1", "unknown option 'beta'"),
        ("resprune:12,alpha=-1", "option 'alpha'"),
        ("resprune:12,alpha=nan", "option 'alpha'"),
        ("resprune:12,alpha=x", "option 'alpha'"),
        ("resprune:12,seed=max", "option 'seed'"),
        ("resprune:12,alpha", "bad option 'alpha'"),
        ("resprune:12,alpha=1,alpha=2", "duplicate option"),
        ("dcp:12,kn=0", "option 'kn'"),
        ("dcp:12,kn=2.5", "option 'kn'"),
        ("rcp:12,layers=3,7", "bad option '7'"),
        ("fastv:12,contextual=3", "unknown option 'contextual'"),
        ("divprune:12,x=1", "no options for divprune"),
    ],
)
def test_errors_name_the_bad_part(text, fragment):
    with pytest.raises(ValueError) as err:
        parse(text)
    msg = str(err.value)
    assert fragment in msg and text in msg


def test_unknown_method_lists_accepted():
    with pytest.raises(ValueError) as err:
        parse("foo:12")
    for m in METHODS:
        assert m in str(err.value)
    assert {"resprune", "dcp", "polymorphic", "rcp", "fastv", "visionzip",
            "divprune"} <= set(METHODS)


def test_unknown_option_lists_accepted_keys():
    with pytest.raises(ValueError, match="accepted: alpha, seed"):
        parse("resprune:12,beta=1")


def test_direct_construction_validated():
    with pytest.raises(ValueError):
        PruneSpec("foo", 3)
    with pytest.raises(ValueError):
        PruneSpec("dcp", 0)
    with pytest.raises(ValueError):
        PruneSpec("dcp", 1.5)


def test_tokens_for_rejects_empty():
    with pytest.raises(ValueError):
        parse("dcp:3").tokens_for(0)
