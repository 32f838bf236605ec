"""``vllm serve MODEL --vtprune SPEC``: the one place where this package bends vLLM's CLI.

vLLM 0.32 has no extension point for new command-line flags (the serve parser is built
from a fixed list of argument groups). It does load general plugins while it builds that
parser, before parsing, so :func:`install` (called by the plugin) wraps
``FlexibleArgumentParser.parse_args`` to rewrite the flag into options vLLM already has:

* ``--hf-overrides {"architectures": [ARCH], "vtprune": SPEC}``, merged into a JSON
  ``--hf-overrides`` the user gave; ARCH is the pruning class of the served model's
  family (:mod:`vllm_vtprune.families`), read from its config when it is a local
  checkpoint or in the Hugging Face cache, else LLaVA-1.5's (whose class checks the
  config again at startup and names the supported families);
* ``--middleware vllm_vtprune.server.usage.VTPruneUsageMiddleware`` (pruning figures in
  every response's usage);
* ``--trust-request-mm-kwargs`` (per-request ``mm_processor_kwargs={"vtprune": ...}``).

A malformed spec stops the command at once with the parser's message. The rewrite is
pinned to the vLLM version it was tested with; ``tests/test_vllm_flag.py`` fails loudly
when the installed vLLM differs or parses the expanded options differently.
"""
from __future__ import annotations

import json
import sys

from vllm_vtprune.families import llava as default_family

TESTED_VLLM_VERSIONS = ("0.32.0",)
FLAG = "--vtprune"
MIDDLEWARE = "vllm_vtprune.server.usage.VTPruneUsageMiddleware"
_installed = False


def _split_flag(argv: list[str], flag: str) -> tuple[list[str], str | None]:
    """Remove ``flag VALUE`` / ``flag=VALUE`` from argv; return the rest and the value."""
    rest: list[str] = []
    value: str | None = None
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == flag:
            if i + 1 >= len(argv):
                raise ValueError(f"{flag} needs a value, e.g. {flag} resprune:128")
            value = argv[i + 1]
            i += 2
            continue
        if a.startswith(flag + "="):
            value = a[len(flag) + 1:]
        else:
            rest.append(a)
        i += 1
    return rest, value


def _option_name(arg: str) -> str:
    """vLLM's spelling rule: ``_`` and ``-`` are the same before the first ``.``
    (of the option's name; a ``=value`` part is left as it is)."""
    if not arg.startswith("--"):
        return arg
    name, eq, value = arg.partition("=")
    head, dot, tail = name.partition(".")
    return "--" + head[2:].replace("_", "-") + dot + tail + eq + value


def _dotted_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _pop_hf_overrides(argv: list[str]) -> tuple[list[str], dict]:
    """Remove every ``--hf-overrides`` form vLLM accepts (JSON, ``=JSON``, dotted
    ``--hf-overrides.a.b V``, list ``...+ a,b``); return the rest and their merged dict."""
    rest: list[str] = []
    merged: dict = {}
    i = 0
    while i < len(argv):
        name, eq, inline = _option_name(argv[i]).partition("=")
        if name != "--hf-overrides" and not name.startswith("--hf-overrides."):
            rest.append(argv[i])
            i += 1
            continue
        if not eq:
            if i + 1 >= len(argv):
                raise ValueError(f"{name} needs a value")
            inline, i = argv[i + 1], i + 1
        i += 1
        if name == "--hf-overrides":
            value = json.loads(inline)
            if not isinstance(value, dict):
                raise ValueError("--hf-overrides must be a JSON object to combine with --vtprune")
            _merge(merged, value)
            continue
        keys = name[len("--hf-overrides."):]
        value = inline.split(",") if keys.endswith("+") else _dotted_value(inline)
        node = merged
        *parents, last = keys.rstrip("+").split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return rest, merged


def _merge(into: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _model_arg(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        name, eq, value = _option_name(a).partition("=")
        if name == "--model":
            return value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    if argv[:1] == ["serve"] and len(argv) > 1 and not argv[1].startswith("-"):
        return argv[1]
    return None


def _served_config(model: str | None):
    """The served model's config when it can be read without a download, else None."""
    import os

    if model is None:
        return None
    from transformers import AutoConfig

    if os.path.isfile(os.path.join(model, "config.json")):
        try:
            return AutoConfig.from_pretrained(model)
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"vtprune: cannot read the config of {model!r}: {err}") from None
    try:
        return AutoConfig.from_pretrained(model, local_files_only=True)
    except Exception:  # not cached: the model class checks it at startup
        return None


def _family(argv: list[str]):
    """The served model's family; refuses a model no family serves, before vLLM starts."""
    from vllm_vtprune import families

    config = _served_config(_model_arg(argv))
    return default_family.FAMILY if config is None else families.for_config(config)


def _check_decoder(spec, family, argv: list[str]) -> None:
    """An in-LLM spec that cannot run on the served decoder fails before vLLM starts
    (when the config can be read here; else the model class refuses it at startup)."""
    from vllm_vtprune import pipeline

    config = _served_config(_model_arg(argv))
    if config is None or not pipeline.acts_in_llm(spec):
        return
    from vllm_vtprune import families

    text = config.get_text_config()
    pipeline.check_fits_decoder(spec, text.num_hidden_layers, text.hidden_size,
                                families.image_tokens(family, config))


def expand(argv: list[str]) -> list[str]:
    """Rewrite ``--vtprune SPEC`` into plain vLLM options (see module docstring)."""
    from vllm_vtprune import spec as spec_mod
    from vllm_vtprune import pipeline
    from vllm_vtprune.pipeline import check_servable

    rest, value = _split_flag(list(argv), FLAG)
    if value is None:
        return list(argv)
    if not value.strip():
        raise ValueError(f"{FLAG} got an empty spec; accepted: METHOD:BUDGET (e.g. "
                         "resprune:128), or none to serve without pruning")
    spec = spec_mod.parse(value)
    family = _family(rest)
    config = _served_config(_model_arg(rest))
    if config is not None:  # rcp:K on the embedded model: the modules shipped for it
        from vllm_vtprune.embedded import with_shipped_modules

        spec = with_shipped_modules(spec, config)
    check_servable(spec, family, server=True)
    _check_decoder(spec, family, rest)
    rest, overrides = _pop_hf_overrides(rest)
    overrides.update({"architectures": [family.architecture],
                      "vtprune": str(spec) if spec else "none"})
    rest += ["--hf-overrides", json.dumps(overrides)]
    names = {_option_name(a).partition("=")[0] for a in rest}
    if "--middleware" not in names or MIDDLEWARE not in rest:
        rest += ["--middleware", MIDDLEWARE]
    if "--trust-request-mm-kwargs" not in names:
        rest.append("--trust-request-mm-kwargs")
    if pipeline.acts_in_llm(spec):
        # the decision layer must see the image and the question in one prefill step,
        # and a KV slot's prune level must belong to one request (see masked_attention)
        for flag in ("--enable-chunked-prefill", "--enable-prefix-caching"):
            if flag in names:
                raise ValueError(f"--vtprune {spec} prunes inside the language model, which "
                                 f"needs {flag.replace('--', '--no-', 1)}; accepted: drop {flag}")
            if flag.replace("--", "--no-", 1) not in names:
                rest.append(flag.replace("--", "--no-", 1))
        if "--enforce-eager" not in names:  # decisions run in Python between layers
            rest.append("--enforce-eager")
    return rest


def install() -> None:
    """Wrap vLLM's parser once; refuses vLLM versions the rewrite was not tested with."""
    global _installed
    if _installed:
        return
    import vllm
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    original = FlexibleArgumentParser.parse_args
    tested = vllm.__version__ in TESTED_VLLM_VERSIONS

    def parse_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else list(args)
        if any(a == FLAG or a.startswith(FLAG + "=") for a in argv):
            if not tested:
                # Only the flag is refused: the plugin must not break plain vLLM use.
                self.error(
                    f"--vtprune was tested with vLLM {', '.join(TESTED_VLLM_VERSIONS)}, "
                    f"found {vllm.__version__}; use the plain-vLLM form instead: "
                    f"--hf-overrides '{{\"architectures\": [\"{default_family.ARCHITECTURE}\"], "
                    f"\"vtprune\": \"SPEC\"}}' --middleware {MIDDLEWARE}")
            try:
                argv = expand(argv)
            except ValueError as err:
                self.error(str(err))
        return original(self, argv, namespace)

    FlexibleArgumentParser.parse_args = parse_args
    _installed = True
