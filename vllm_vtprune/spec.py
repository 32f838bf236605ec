"""Pruning specifications: the ``METHOD:BUDGET[,key=value...]`` strings users pass.

Grammar::

    spec    := METHOD ":" BUDGET ("," KEY "=" VALUE)*
    BUDGET  := integer >= 1 (a token count)  |  decimal in (0, 1] with a "." (a ratio)

Examples: ``resprune:128``, ``resprune:0.25,alpha=0.75,seed=cls``, ``dcp:16,delta=0.1``,
``fastv:192,layer=2``, ``visionzip:64,contextual=10``, ``rcp:64,ckpt=/path,layers=2-14-26``.

``None`` (no spec given) and ``"none"`` (any case) mean "no pruning": :func:`parse`
returns None. An empty or blank string is an error (it is almost always a shell variable
that was not set), whose message says that ``none`` turns pruning off.
Values of list-like options (``layers``) are written with ``-`` between the items since
``,`` separates options; they are kept as strings and interpreted by the method.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vllm_vtprune import registry

__all__ = ["PruneSpec", "parse", "METHODS"]

Value = str | int | float


def __getattr__(name: str):
    # Derived from the registry on first use (the registry imports the method modules).
    if name == "METHODS":
        return registry.names()
    raise AttributeError(name)


_INT_BUDGET = re.compile(r"[1-9]\d*")
_RATIO_BUDGET = re.compile(r"(?:0?\.\d+|1\.0*|0\.\d*|1\.)")


@dataclass(frozen=True)
class PruneSpec:
    """A parsed pruning spec; ``str(spec)`` gives back the canonical spec string."""

    method: str
    budget: int | float
    options: tuple[tuple[str, Value], ...] = ()

    def __post_init__(self) -> None:
        registry.get(self.method)  # raises naming the accepted methods
        b = self.budget
        ok_int = isinstance(b, int) and not isinstance(b, bool) and b >= 1
        ok_ratio = isinstance(b, float) and 0 < b <= 1
        if not (ok_int or ok_ratio):
            raise ValueError(
                f"bad budget {b!r}; accepted: an integer >= 1 or a float ratio in (0, 1]"
            )

    def option(self, name: str, default: Value | None = None) -> Value | None:
        """The value of option ``name``, or ``default`` when the spec does not set it."""
        for key, value in self.options:
            if key == name:
                return value
        return default

    def with_option(self, name: str, value: Value) -> "PruneSpec":
        options = dict(self.options)
        options[name] = value
        return PruneSpec(self.method, self.budget, tuple(sorted(options.items())))

    def value(self, name: str) -> Value | None:
        """The option's value, or the default the method declares for it."""
        return self.option(name, registry.get(self.method).option(name).default)

    @property
    def text_conditioned(self) -> bool:
        """Whether the kept set depends on the prompt (then the caches must key on it)."""
        m = registry.get(self.method)
        return m.text_conditioned(m.resolved(dict(self.options)))

    def tokens_for(self, n: int) -> int:
        """Tokens to keep out of ``n``: min(budget, n) or max(1, round(ratio * n)).

        ``round`` is Python's (half to even), so ``0.5`` of 5 tokens keeps 2.
        """
        if n < 1:
            raise ValueError(f"number of tokens must be >= 1, got {n}")
        if isinstance(self.budget, int):
            return min(self.budget, n)
        return min(n, max(1, round(self.budget * n)))

    def __str__(self) -> str:
        budget = str(self.budget) if isinstance(self.budget, int) else _ratio_text(self.budget)
        parts = [f"{self.method}:{budget}"]
        parts += [f"{k}={v!r}" if isinstance(v, float) else f"{k}={v}" for k, v in self.options]
        return ",".join(parts)


def _ratio_text(ratio: float) -> str:
    """Shortest decimal form without an exponent (``parse`` does not read exponents)."""
    text = repr(float(ratio))
    if "e" in text:
        text = f"{ratio:.17f}".rstrip("0")
    return text


def _fail(spec: str, what: str, accepted: str) -> ValueError:
    return ValueError(f"{what} in vtprune spec {spec!r}; accepted: {accepted}")


def _parse_budget(spec: str, text: str) -> int | float:
    accepted = "an integer token count >= 1 or a ratio in (0, 1] with a decimal point"
    if _INT_BUDGET.fullmatch(text):
        return int(text)
    if _RATIO_BUDGET.fullmatch(text):
        ratio = float(text)
        if 0 < ratio <= 1:
            return ratio
    raise _fail(spec, f"bad budget {text!r}", accepted)


def parse(spec: str | None) -> PruneSpec | None:
    """Parse ``METHOD:BUDGET[,key=value...]``; None and "none" give None (no pruning).

    Raises ValueError naming the bad part and listing what is accepted.  Options are
    stored sorted by key, so equivalent specs compare equal and print identically.
    """
    if spec is None:
        return None
    if not isinstance(spec, str):
        raise ValueError(f"vtprune spec must be a string, got {type(spec).__name__}")
    text = spec.strip()
    if text == "":
        raise _fail(spec, "empty spec", "METHOD:BUDGET[,key=value...], or none to turn "
                    f"pruning off; methods: {', '.join(registry.names())}")
    if text.lower() == "none":
        return None
    head, _, rest = text.partition(",")
    method, colon, budget_text = head.partition(":")
    method = method.strip().lower()
    if method not in registry.methods():
        raise _fail(spec, f"unknown method {method!r}", ", ".join(registry.names()))
    if not colon:
        raise _fail(spec, f"missing budget after method {method!r}", "METHOD:BUDGET[,key=value...]")
    budget = _parse_budget(spec, budget_text.strip())
    allowed = {o.name: o.parse for o in registry.get(method).options}
    accepted_keys = ", ".join(sorted(allowed)) or f"no options for {method}"
    options: dict[str, Value] = {}
    for item in rest.split(",") if rest else []:
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or not key or not value:
            raise _fail(spec, f"bad option {item.strip()!r} (expected key=value)", accepted_keys)
        if key not in allowed:
            raise _fail(spec, f"unknown option {key!r} for method {method!r}", accepted_keys)
        if key in options:
            raise _fail(spec, f"duplicate option {key!r}", accepted_keys)
        try:
            options[key] = allowed[key](value)
        except ValueError as err:
            raise ValueError(
                f"bad value {value!r} for option {key!r} in vtprune spec {spec!r}: {err}"
            ) from None
    return PruneSpec(method, budget, tuple(sorted(options.items())))
