"""The registry of pruning methods: every fact about a method, declared once.

Each module of :mod:`vllm_vtprune.methods` that defines ``METHOD = Method(...)`` is a
method (found by :func:`methods`, no list to edit). Spec parsing and its errors, the
servable/refused decision, the pipeline's dispatch, text conditioning (which keys the
caches), the benches' method lists, the parity tests and ``vtprune methods`` all read
it from here.

A method is *served* when it declares an entry point (``prune``) for where it acts; the
others (inside the LLM) are declared so that specs naming them parse, and are refused
with a message that says which methods are served.
"""
from __future__ import annotations

import dataclasses
import enum
import importlib
import pkgutil
import re
from typing import Callable, Mapping

Value = str | int | float

__all__ = ["Where", "Option", "Method", "methods", "get", "names", "served",
           "float_ge0", "float_pos", "int_ge", "choice", "layer_list", "path"]


class Where(str, enum.Enum):
    """Where a method acts; encoder-side methods run in the pipeline, the others in the LLM."""

    INSIDE_ENCODER = "inside the vision encoder"
    ENCODER_OUTPUT = "encoder output"
    PROJECTOR_OUTPUT = "projector output"
    INSIDE_LLM = "inside the language model"

    @property
    def encoder_side(self) -> bool:
        return self is not Where.INSIDE_LLM


# ---------------------------------------------------------------- option converters
def _to_float(v: str, requirement: str) -> float:
    try:
        f = float(v)
    except ValueError:
        raise ValueError(f"must be {requirement}") from None
    if f != f or f in (float("inf"), float("-inf")):
        raise ValueError(f"must be {requirement}")
    return f


def float_ge0(v: str) -> float:
    f = _to_float(v, "a finite float >= 0")
    if f < 0:
        raise ValueError("must be a finite float >= 0")
    return f


def float_pos(v: str) -> float:
    f = _to_float(v, "a finite float > 0")
    if f <= 0:
        raise ValueError("must be a finite float > 0")
    return f


def int_ge(lo: int) -> Callable[[str], int]:
    def conv(v: str) -> int:
        if not re.fullmatch(r"[+]?\d+", v):
            raise ValueError(f"must be an integer >= {lo}")
        i = int(v)
        if i < lo:
            raise ValueError(f"must be an integer >= {lo}")
        return i

    return conv


def choice(*names: str) -> Callable[[str], str]:
    def conv(v: str) -> str:
        if v not in names:
            raise ValueError(f"must be one of {', '.join(names)}")
        return v

    return conv


def layer_list(v: str) -> str:
    if not re.fullmatch(r"\d+(-\d+)*", v):
        raise ValueError("must be layer numbers joined by '-', e.g. 2-14-26")
    return v


def path(v: str) -> str:
    if not v:
        raise ValueError("must be a non-empty path")
    return v


# ---------------------------------------------------------------- declarations
@dataclasses.dataclass(frozen=True)
class Option:
    name: str
    parse: Callable[[str], Value]
    default: Value | None
    help: str


@dataclasses.dataclass(frozen=True)
class Method:
    """What a method is. ``prune`` is its encoder-side entry point
    (``prune(ctx: pipeline.ImageContext) -> pipeline.PrunedImage``); None: not served."""

    name: str
    where: Where
    summary: str
    paper: str
    options: tuple[Option, ...] = ()
    #: What it reads besides the tokens: "cls_attention", "keys", "encoder_layers",
    #: "text" (the prompt's nouns), "llm_attention", "checkpoint"; given the spec's
    #: options when it depends on them.
    needs: frozenset[str] | Callable[[Mapping[str, Value]], frozenset[str]] = frozenset()
    #: Whether the kept set depends on the prompt, given the spec's options.
    text_conditioned: Callable[[Mapping[str, Value]], bool] = lambda options: False
    prune: Callable | None = None
    #: Methods inside the LLM: ``llm_plan(spec, image_spans, num_layers, full_tokens) ->
    #: vllm_vtprune.llm_loop.Plan`` of one request (``full_tokens``: each image's
    #: unpruned patch count, or one int for every image), run by both the reference loop
    #: and vLLM's decoder.
    llm_plan: Callable | None = None
    #: Methods inside the LLM with an encoder-side stage (``prune`` runs it):
    #: ``encoder_budget(spec, num_tokens) -> tokens the LLM receives``.
    encoder_budget: Callable | None = None
    #: Methods inside the LLM: ``check_model(spec, num_layers, hidden_size)`` refuses a
    #: spec that does not fit the served decoder (a checkpoint made for another model).
    check_model: Callable | None = None
    #: ``check_options(options)`` refuses options that cannot work whatever the model
    #: (a checkpoint that is missing or unreadable), before vLLM starts.
    check_options: Callable | None = None

    @property
    def served(self) -> bool:
        if self.where is Where.INSIDE_LLM:
            return self.llm_plan is not None
        return self.prune is not None

    def option(self, name: str) -> Option:
        for opt in self.options:
            if opt.name == name:
                return opt
        raise KeyError(name)

    def needs_for(self, given: Mapping[str, Value]) -> frozenset[str]:
        return self.needs(self.resolved(given)) if callable(self.needs) else self.needs

    def resolved(self, given: Mapping[str, Value]) -> dict[str, Value]:
        """Every option's value: the given ones, defaults for the rest."""
        return {opt.name: given.get(opt.name, opt.default) for opt in self.options}


_METHODS: dict[str, Method] | None = None


def methods() -> dict[str, Method]:
    """Every declared method by name (sorted), discovered in :mod:`vllm_vtprune.methods`."""
    global _METHODS
    if _METHODS is None:
        import vllm_vtprune.methods as pkg

        found: dict[str, Method] = {}
        for info in pkgutil.iter_modules(pkg.__path__):
            if info.name.startswith("_"):
                continue
            module = importlib.import_module(f"{pkg.__name__}.{info.name}")
            method = getattr(module, "METHOD", None)
            if isinstance(method, Method):
                if method.name in found:
                    raise RuntimeError(f"two modules declare method {method.name!r}")
                found[method.name] = method
        _METHODS = dict(sorted(found.items()))
    return _METHODS


def names() -> tuple[str, ...]:
    return tuple(methods())


def served() -> tuple[str, ...]:
    return tuple(n for n, m in methods().items() if m.served)


def in_llm() -> tuple[str, ...]:
    """Served methods that act inside the LLM."""
    return tuple(n for n, m in methods().items() if m.served and m.where is Where.INSIDE_LLM)


def get(name: str) -> Method:
    try:
        return methods()[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; accepted: {', '.join(names())}") from None


def check_served(method: str, provides: frozenset[str] | None = None,
                 model: str = "this model", options: Mapping[str, Value] = {},
                 server: bool = False) -> None:
    """Refuse a declared method that this version does not serve, naming those it does;
    one that acts inside the LLM unless ``server`` (the server's spec, or a request to a
    server started with an in-LLM spec, whose decoder has the masked attention); and one
    that needs what the served model (``provides``) does not have."""
    m = get(method)
    if m.where is Where.INSIDE_LLM and m.served and not server:
        raise ValueError(
            f"vtprune method {method!r} prunes {m.where.value}, which needs the decoder "
            f"attention a server installs when started with such a spec (--vtprune "
            f"{method}:K, or any of {', '.join(in_llm())}); this server accepts per "
            f"request: {', '.join(n for n in served() if n not in in_llm())}")
    if m.served and m.check_options is not None:
        m.check_options(m.resolved(options))
    if not m.served:
        raise ValueError(
            f"vtprune method {method!r} prunes {m.where.value}, which this version does "
            f"not serve yet; methods served: {', '.join(served())}")
    missing = m.needs_for(options) - provides if provides is not None else set()
    if missing:
        usable = [n for n in served() if get(n).needs_for({}) <= provides]
        raise ValueError(
            f"vtprune method {method!r} needs {', '.join(sorted(missing))}, not available on "
            f"{model}; methods served for it: {', '.join(usable)}")


def listing() -> str:
    """The ``vtprune methods`` table."""
    rows = []
    for m in methods().values():
        opts = ", ".join(f"{o.name}={o.default}" if o.default is not None else o.name
                         for o in m.options) or "-"
        state = "served" if m.served else "not served yet"
        rows.append(f"{m.name:12} {m.where.value:26} {state:15} options: {opts}\n"
                    f"{'':12} {m.summary}\n{'':12} {m.paper}")
    return "\n".join(rows)
