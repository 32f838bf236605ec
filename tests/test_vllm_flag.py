"""``--vtprune SPEC``: the argv rewrite, and the real vLLM serve parser consuming it.

The integration tests at the bottom build vLLM's own parser the way ``vllm serve``
does; they are the ones that fail loudly when a vLLM upgrade changes the CLI.
"""
from __future__ import annotations

import json

import re
from pathlib import Path

import pytest

from vllm_vtprune import vllm_flag

ARCH = "VTPruneLlavaForConditionalGeneration"
MIDDLEWARE = "vllm_vtprune.server.usage.VTPruneUsageMiddleware"


def _option(argv, name):
    """Values of every ``name VALUE`` / ``name=VALUE`` occurrence in argv."""
    values = []
    for i, a in enumerate(argv):
        if a == name:
            values.append(argv[i + 1])
        elif a.startswith(name + "="):
            values.append(a[len(name) + 1:])
    return values


def _overrides(argv):
    values = _option(argv, "--hf-overrides")
    assert len(values) == 1, argv
    return json.loads(values[0])


def test_expand_basic():
    out = vllm_flag.expand(["serve", "M", "--vtprune", "resprune:128"])
    assert out[:2] == ["serve", "M"]
    assert not any(a.startswith("--vtprune") for a in out)
    assert "resprune:128" not in out
    assert _overrides(out) == {"architectures": [ARCH], "vtprune": "resprune:128"}
    assert _option(out, "--middleware") == [MIDDLEWARE]
    assert out.count("--trust-request-mm-kwargs") == 1


def test_expand_equals_form_and_canonical_spec():
    out = vllm_flag.expand(["serve", "M", "--port", "8001",
                            "--vtprune=RESPRUNE:0.25,seed=cls, alpha=0.5"])
    assert out[:4] == ["serve", "M", "--port", "8001"]
    ov = _overrides(out)
    assert ov["architectures"] == [ARCH]
    # Method lower-cased, options sorted by key.
    assert ov["vtprune"] == "resprune:0.25,alpha=0.5,seed=cls"
    assert "--trust-request-mm-kwargs" in out


def test_expand_keeps_other_options_in_order():
    argv = ["serve", "M", "--max-model-len", "4096", "--vtprune", "divprune:64",
            "--dtype", "float32"]
    out = vllm_flag.expand(argv)
    rest = [a for a in argv if a not in ("--vtprune", "divprune:64")]
    assert out[:len(rest)] == rest


@pytest.mark.parametrize("form", ["space", "equals"])
def test_expand_merges_existing_hf_overrides(form):
    user = {"max_position_embeddings": 8192, "vtprune": "stale:1",
            "text_config": {"rope_theta": 10000}}
    given = (["--hf-overrides", json.dumps(user)] if form == "space"
             else ["--hf-overrides=" + json.dumps(user)])
    out = vllm_flag.expand(["serve", "M"] + given + ["--vtprune", "visionzip:64"])
    assert _overrides(out) == {"max_position_embeddings": 8192,
                               "text_config": {"rope_theta": 10000},
                               "architectures": [ARCH], "vtprune": "visionzip:64"}


def test_expand_hf_overrides_after_flag_also_merged():
    out = vllm_flag.expand(["serve", "M", "--vtprune", "dcp:16",
                            "--hf-overrides", '{"foo": 1}'])
    assert _overrides(out) == {"foo": 1, "architectures": [ARCH], "vtprune": "dcp:16"}


def test_expand_non_object_hf_overrides_rejected():
    with pytest.raises(ValueError, match="JSON object"):
        vllm_flag.expand(["serve", "M", "--hf-overrides", "[1, 2]", "--vtprune", "dcp:16"])


def test_expand_does_not_duplicate_user_middleware_or_trust_flag():
    out = vllm_flag.expand(["serve", "M", "--trust-request-mm-kwargs", "--middleware",
                            MIDDLEWARE, "--vtprune", "resprune:64"])
    assert out.count("--trust-request-mm-kwargs") == 1
    assert out.count(MIDDLEWARE) == 1


def test_expand_none_spec_selects_our_class_without_pruning():
    out = vllm_flag.expand(["serve", "M", "--vtprune", "none"])
    assert _overrides(out) == {"architectures": [ARCH], "vtprune": "none"}


@pytest.mark.parametrize("spec, bad", [
    ("resprune:abc", "abc"),
    ("nosuch:64", "nosuch"),
    ("resprune:64,bogus=1", "bogus"),
    ("resprune:64,alpha=-1", "alpha"),
    ("resprune", "missing budget"),
    ("resprune:0", "0"),
    ("resprune:1.5", "1.5"),
])
def test_expand_malformed_spec_names_bad_part(spec, bad):
    with pytest.raises(ValueError) as err:
        vllm_flag.expand(["serve", "M", "--vtprune", spec])
    assert bad in str(err.value)


@pytest.mark.parametrize("spec, says", [
    ("rcp:64", "rcp:K,ckpt=PATH"),
    ("rcp:0.5,layers=2-4", "rcp:K,ckpt=PATH"),
    ("rcp:64,ckpt=/nonexistent/rcp.pt", "ckpt=/nonexistent/rcp.pt: no such file"),
])
def test_expand_refuses_rcp_without_a_readable_checkpoint(spec, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        vllm_flag.expand(["serve", "M", "--vtprune", spec])


def test_expand_refuses_a_file_that_is_no_rcp_checkpoint(tmp_path):
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"ckpt={re.escape(str(bad))}: cannot be read"):
        vllm_flag.expand(["serve", "M", "--vtprune", f"rcp:64,ckpt={bad}"])


def test_expand_adds_what_pruning_inside_the_llm_needs():
    out = vllm_flag.expand(["serve", "M", "--vtprune", "fastv:64"])
    for flag in ("--no-enable-chunked-prefill", "--no-enable-prefix-caching", "--enforce-eager"):
        assert flag in out


@pytest.mark.parametrize("value", ["", "   "])
def test_expand_empty_spec_is_an_error_naming_none(value):
    with pytest.raises(ValueError, match="empty spec.*none to serve without pruning"):
        vllm_flag.expand(["serve", "M", "--vtprune", value])


def test_expand_maps_a_local_checkpoint_to_its_family_class(tmp_path):
    from transformers import LlamaConfig

    from vllm_vtprune.embedded import SMALL_MODEL, model_path
    from vllm_vtprune.families import llava

    out = vllm_flag.expand(["serve", model_path(SMALL_MODEL), "--vtprune", "random:16"])
    overrides = json.loads(out[out.index("--hf-overrides") + 1])
    assert overrides["architectures"] == [llava.ARCHITECTURE]
    # the config is read: a model of no family is refused before vLLM starts
    LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model type 'llama'.*supported: LLaVA-1.5"):
        vllm_flag.expand(["serve", str(tmp_path), "--vtprune", "random:16"])


def test_expand_fastv_turns_off_chunked_prefill_and_the_prefix_cache():
    out = vllm_flag.expand(["serve", "M", "--vtprune", "fastv:64"])
    assert "--no-enable-chunked-prefill" in out and "--no-enable-prefix-caching" in out
    for flag in ("--enable-chunked-prefill", "--enable-prefix-caching"):
        with pytest.raises(ValueError, match=f"fastv:64 .*drop {flag}"):
            vllm_flag.expand(["serve", "M", flag, "--vtprune", "fastv:64"])


def test_expand_flag_without_value():
    with pytest.raises(ValueError, match="needs a value"):
        vllm_flag.expand(["serve", "M", "--vtprune"])


@pytest.mark.parametrize("argv", [
    [],
    ["serve", "M"],
    ["serve", "M", "--hf-overrides", '{"a": 1}', "--port", "8000"],
    ["serve", "M", "--vtprune-other", "x"],
])
def test_expand_without_flag_leaves_argv_unchanged(argv):
    before = list(argv)
    out = vllm_flag.expand(argv)
    assert out == before
    assert argv == before


# ---------------------------------------------------------------- the real vLLM parser


@pytest.fixture
def vllm_parser_state():
    """Restore FlexibleArgumentParser.parse_args and the install flag afterwards."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    saved = FlexibleArgumentParser.__dict__["parse_args"]
    saved_installed = vllm_flag._installed
    yield FlexibleArgumentParser
    FlexibleArgumentParser.parse_args = saved
    vllm_flag._installed = saved_installed


def test_installed_vllm_is_a_tested_version():
    import vllm

    assert vllm.__version__ in vllm_flag.TESTED_VLLM_VERSIONS, (
        f"vLLM {vllm.__version__} is installed but --vtprune was tested with "
        f"{vllm_flag.TESTED_VLLM_VERSIONS}: re-check the rewrite and update the pin")


def _serve_parser_like_vllm(FlexibleArgumentParser):
    """The top-level parser with the serve subcommand, as vllm.entrypoints.cli.main."""
    from vllm.entrypoints.cli.serve import ServeSubcommand

    parser = FlexibleArgumentParser(description="vLLM CLI")
    subparsers = parser.add_subparsers(required=False, dest="subparser")
    ServeSubcommand().subparser_init(subparsers)
    return parser


def _as_dict(value):
    return json.loads(value) if isinstance(value, str) else value


def _check_namespace(ns, spec):
    overrides = _as_dict(ns.hf_overrides)
    assert overrides["architectures"] == [ARCH]
    assert overrides["vtprune"] == spec
    assert MIDDLEWARE in ns.middleware
    assert ns.trust_request_mm_kwargs is True


def test_real_vllm_serve_parser_accepts_flag(vllm_parser_state):
    from vllm.entrypoints.launchers.cli_args import make_arg_parser

    FlexibleArgumentParser = vllm_parser_state
    vllm_flag.install()

    # The serve subcommand's own parser.
    serve = make_arg_parser(FlexibleArgumentParser())
    ns = serve.parse_args(["/some/model", "--vtprune", "divprune:64"])
    assert ns.model_tag == "/some/model"
    _check_namespace(ns, "divprune:64")

    # Without the flag nothing of ours appears.
    ns = serve.parse_args(["/some/model"])
    assert "vtprune" not in (_as_dict(ns.hf_overrides) or {})
    assert MIDDLEWARE not in (ns.middleware or [])
    assert not ns.trust_request_mm_kwargs

    # `vllm serve ...` through the top-level parser, user overrides merged.
    parser = _serve_parser_like_vllm(FlexibleArgumentParser)
    ns = parser.parse_args(["serve", "/some/model", "--hf-overrides",
                            '{"max_position_embeddings": 4096}', "--vtprune=resprune:0.25"])
    assert ns.subparser == "serve"
    assert ns.model_tag == "/some/model"
    _check_namespace(ns, "resprune:0.25")
    assert _as_dict(ns.hf_overrides)["max_position_embeddings"] == 4096


@pytest.mark.parametrize("spec, bad", [("divprune:lots", "lots"), ("rcp:64", "rcp"),
                                       ("resprune:64,bogus=2", "bogus")])
def test_real_vllm_serve_parser_rejects_bad_spec(vllm_parser_state, capsys, spec, bad):
    from vllm.entrypoints.launchers.cli_args import make_arg_parser

    FlexibleArgumentParser = vllm_parser_state
    vllm_flag.install()
    serve = make_arg_parser(FlexibleArgumentParser())
    with pytest.raises(SystemExit) as exit_info:
        serve.parse_args(["/some/model", "--vtprune", spec])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error" in err and bad in err


def test_untested_vllm_refuses_only_the_flag(vllm_parser_state, monkeypatch, capsys):
    """Plain vLLM use keeps working on another vLLM; only --vtprune is refused."""
    import vllm
    from vllm.entrypoints.launchers.cli_args import make_arg_parser

    FlexibleArgumentParser = vllm_parser_state
    monkeypatch.setattr(vllm, "__version__", "0.0.1-untested")
    vllm_flag._installed = False
    vllm_flag.install()
    parser = make_arg_parser(FlexibleArgumentParser())
    plain = parser.parse_args(["/some/model", "--max-model-len", "512"])
    assert plain.max_model_len == 512
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["/some/model", "--vtprune", "resprune:64"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "0.0.1-untested" in err and "--hf-overrides" in err


@pytest.mark.parametrize("user_args", [
    ["--hf-overrides", '{"max_position_embeddings": 4096}'],
    ["--hf-overrides={\"max_position_embeddings\": 4096}"],
    # vLLM's FlexibleArgumentParser accepts underscores for every option...
    ["--hf_overrides", '{"max_position_embeddings": 4096}'],
    # ...and the dotted form for JSON options.
    ["--hf-overrides.max_position_embeddings", "4096"],
])
def test_real_parser_merges_every_spelling_of_user_hf_overrides(vllm_parser_state, user_args):
    """Whatever spelling vLLM accepts for --hf-overrides, both the user's keys and ours
    must reach the namespace (no silent loss of either)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser

    vllm_flag.install()
    serve = make_arg_parser(vllm_parser_state())
    ns = serve.parse_args(["/some/model"] + user_args + ["--vtprune", "divprune:64"])
    overrides = _as_dict(ns.hf_overrides)
    assert overrides.get("architectures") == [ARCH], overrides
    assert overrides.get("vtprune") == "divprune:64", overrides
    assert overrides.get("max_position_embeddings") == 4096, overrides


def test_rcp_without_ckpt_serves_the_modules_shipped_for_the_embedded_model(
        tmp_path, monkeypatch, rcp_checkpoint):
    """What ships for an embedded model (``rcp/<its name>.safetensors``) is found
    without ckpt=, for that model only; other models must name one."""
    import json
    import shutil

    from vllm_vtprune import embedded
    from vllm_vtprune.embedded import DEFAULT_MODEL, SMALL_MODEL, model_path

    shipped = tmp_path / "rcp"
    shipped.mkdir()
    shutil.copy(rcp_checkpoint, shipped / f"{SMALL_MODEL}.safetensors")
    monkeypatch.setattr(embedded, "RCP_DIR", shipped)
    out = vllm_flag.expand(["serve", model_path(SMALL_MODEL), "--vtprune", "rcp:64"])
    overrides = json.loads(out[out.index("--hf-overrides") + 1])
    assert overrides["vtprune"] == f"rcp:64,ckpt={shipped / SMALL_MODEL}.safetensors"
    # the other embedded model has none shipped in this directory
    with pytest.raises(ValueError, match=re.escape("rcp:K,ckpt=PATH")):
        vllm_flag.expand(["serve", model_path(DEFAULT_MODEL), "--vtprune", "rcp:64"])
    other = tmp_path / "other-llava"  # the embedded model with a wider decoder
    other.mkdir()
    config = json.loads((Path(model_path(SMALL_MODEL)) / "config.json").read_text())
    config["text_config"]["intermediate_size"] *= 2
    (other / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        if (Path(model_path(SMALL_MODEL)) / name).exists():
            shutil.copy(Path(model_path(SMALL_MODEL)) / name, other / name)
    with pytest.raises(ValueError, match=re.escape("rcp:K,ckpt=PATH")):
        vllm_flag.expand(["serve", str(other), "--vtprune", "rcp:64"])
