"""An explicit decoder loop over a transformers Llama with visual tokens pruned inside
the LLM: the reference path for methods that act there (FastV, Polymorphic's stage 2,
RCP; each method's module builds its :class:`Plan`, see ``registry.Method.llm_plan``).

Layer by layer, in plain PyTorch (gpt-fast style), so that a decision taken after layer
``l`` can act on the rows of the batch. Two ways to carry it out, meant to agree on every
kept token (``tests/test_llm_loop.py`` checks that they do):

* ``"remove"``: pruned rows leave the batch before the next layer (their QKV and MLP
  work is skipped, and deeper layers keep no KV for them); kept tokens keep their
  original position ids. This is how FastV, Polymorphic and RCP count their savings.
* ``"mask"``: every row goes through every layer, but from the decision on, a pruned
  token is attended by no query of the request but its own (its diagonal stays so its
  softmax row is defined). This is what a serving engine with a fixed batch layout
  (vLLM's per-step metadata is shared by all layers) can do.

Decisions are cumulative: a token pruned after layer ``l`` stays pruned at every deeper
layer, in prefill and in every decode step. Per-step state lives in a small
:class:`Step` object the layers read, so layer signatures never change.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import Tensor

MODES = ("remove", "mask")


@dataclasses.dataclass
class LayerKV:
    keys: Tensor  # [H_kv, S, d] after RoPE
    values: Tensor  # [H_kv, S, d]
    alive: Tensor  # [S] bool: may later queries attend this key ("mask" mode)
    rows: Tensor  # [S] prompt positions of the prefill keys (generated ones not listed)


@dataclasses.dataclass
class Step:
    """What the layers of one forward step read."""

    positions: Tensor  # [T] position ids of the rows in the batch ([3, T]: M-RoPE's)
    causal: Tensor  # [T, S] bool: query t may attend key s (before pruning masks)
    want_probs: bool = False  # the next layer decides: keep this layer's softmax


@dataclasses.dataclass
class LayerView:
    """What a decision taken before layer ``l`` reads, restricted to the rows still alive."""

    probs: Tensor  # [H, T, T] softmax attention of layer l-1 among the live rows
    rows: Tensor  # [T] prompt positions of the live rows (ascending)
    hidden: Tensor  # [T, d] residual stream entering layer l


@dataclasses.dataclass
class Verdict:
    """A decision: which live rows stay, and (methods that merge what they drop into what
    they keep) the kept rows' new residual stream."""

    keep: Tensor  # ascending indices into the view's rows
    hidden: Tensor | None = None  # [len(keep), d]


Decide = Callable[[LayerView], Verdict]
#: Applied after layer l to the answer rows (the last prompt row in prefill, every
#: decoded row): [R, d] residual stream -> [R, d].
Adapt = Callable[[Tensor], Tensor]


@dataclasses.dataclass
class Plan:
    """Per-request pruning plan: decisions keyed by the layer they act before, adapters
    by the layer they act after. A plan may keep state between its layers (RCP's
    cumulative mask, its adapters' context), so one plan serves one request."""

    decisions: dict[int, Decide] = dataclasses.field(default_factory=dict)
    adapters: dict[int, Adapt] = dataclasses.field(default_factory=dict)
    #: visual tokens each decoder layer processes (the plan's schedule; a learned
    #: threshold may keep fewer), for the figures ``usage.vtprune`` reports
    visual_counts: list[int] = dataclasses.field(default_factory=list)


class PrunedDecoder:
    """Runs a transformers ``LlamaModel`` (``language_model``) and its ``lm_head``."""

    def __init__(self, language_model, lm_head):
        self.lm = language_model
        self.lm_head = lm_head
        cfg = language_model.config
        self.num_heads = cfg.num_attention_heads
        self.num_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)

    @property
    def num_layers(self) -> int:
        return len(self.lm.layers)

    # ---------------------------------------------------------------- one layer
    def _layer(self, i: int, x: Tensor, step: Step, kv: LayerKV) -> tuple[Tensor, Tensor | None]:
        layer = self.lm.layers[i]
        attn = layer.self_attn
        t = x.shape[0]
        q, k, v = attention_inputs(self.lm, i, x, step.positions, self.num_heads, self.num_kv,
                                   self.head_dim)
        kv.keys = torch.cat([kv.keys, k[0]], dim=1)
        kv.values = torch.cat([kv.values, v], dim=1)
        rep = self.num_heads // self.num_kv
        keys = kv.keys.repeat_interleave(rep, dim=0)
        values = kv.values.repeat_interleave(rep, dim=0)
        scores = (q[0] @ keys.transpose(1, 2)) * attn.scaling
        allowed = step.causal & kv.alive[None, :]
        allowed = allowed | _own_key(t, kv.keys.shape[1], allowed.device)
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")).float(), dim=-1)
        out = (probs.to(values.dtype) @ values).transpose(0, 1).reshape(t, -1)
        x = x + attn.o_proj(out)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        return x, probs if step.want_probs else None

    # ---------------------------------------------------------------- prefill
    @torch.no_grad()
    def prefill(self, embeds: Tensor, plan: Plan, mode: str = "remove",
                positions: Tensor | None = None):
        """Logits [V] at the last prompt position, and the per-layer KV to decode with.

        ``positions``: the prompt's position ids, [T] or M-RoPE's [3, T] (Qwen2-VL);
        default ``0..T-1``. A kept row keeps its own wherever rows are removed."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        n, dev = embeds.shape[0], embeds.device
        x, rows = embeds, torch.arange(n, device=dev)
        if positions is None:
            positions = rows
        alive = torch.ones(n, dtype=torch.bool, device=dev)  # "mask" mode: rows not pruned so far
        cache: list[LayerKV] = []
        probs = None
        for i in range(self.num_layers):
            if i in plan.decisions:
                live = (torch.arange(len(rows), device=dev) if mode == "remove"
                        else torch.nonzero(alive).flatten())
                verdict = plan.decisions[i](LayerView(probs, rows[live], x[live]))
                if verdict.hidden is not None:
                    x = x.clone()
                    x[live[verdict.keep]] = verdict.hidden.to(x.dtype)
                if mode == "remove":
                    x, rows = x[verdict.keep], rows[verdict.keep]
                else:
                    alive = alive & _as_mask(rows[live[verdict.keep]], n)
            step = Step(positions[..., rows], _causal(rows, rows),
                        want_probs=(i + 1) in plan.decisions)
            kv = LayerKV(embeds.new_zeros(self.num_kv, 0, self.head_dim),
                         embeds.new_zeros(self.num_kv, 0, self.head_dim),
                         alive if mode == "mask"
                         else torch.ones(len(rows), dtype=torch.bool, device=dev),
                         rows)
            x, probs = self._layer(i, x, step, kv)
            if mode == "mask" and probs is not None:
                probs = probs[:, alive][:, :, alive]  # decisions see the live tokens only
            if i in plan.adapters:
                x = torch.cat([x[:-1], plan.adapters[i](x[-1:])])
            cache.append(kv)
        last = self.lm.norm(x[-1:])
        return self.lm_head(last)[0], cache

    # ---------------------------------------------------------------- decode
    @torch.no_grad()
    def decode(self, embed: Tensor, position, cache: list[LayerKV],
               plan: Plan | None = None) -> Tensor:
        """Logits [V] for one new token at ``position`` (an int, or M-RoPE's [3]) attending
        each layer's cache (``plan``: the prefill's, whose adapters act on every decoded
        row)."""
        x, dev = embed[None], embed.device
        pos = (position.to(dev).view(-1, 1) if isinstance(position, Tensor)
               else torch.tensor([position], device=dev))
        for i in range(self.num_layers):
            kv = cache[i]
            kv.alive = torch.cat([kv.alive, torch.ones(1, dtype=torch.bool, device=dev)])
            step = Step(pos, torch.ones(1, kv.keys.shape[1] + 1, dtype=torch.bool, device=dev))
            x, _ = self._layer(i, x, step, kv)
            if plan is not None and i in plan.adapters:
                x = plan.adapters[i](x)
        return self.lm_head(self.lm.norm(x))[0]


def attention_inputs(lm, i: int, x: Tensor, positions: Tensor, heads: int, kv_heads: int,
                     head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Layer ``i``'s q [1, H, T, d] and k [1, H_kv, T, d] after RoPE, and v [H_kv, T, d],
    for the residual stream ``x`` [T, D] of a transformers Llama (``lm``)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = lm.layers[i].self_attn
    h = lm.layers[i].input_layernorm(x)
    t = h.shape[0]
    q = attn.q_proj(h).view(t, heads, head_dim).transpose(0, 1)
    k = attn.k_proj(h).view(t, kv_heads, head_dim).transpose(0, 1)
    v = attn.v_proj(h).view(t, kv_heads, head_dim).transpose(0, 1)
    # Llama's rotary takes [1, T] ids; Qwen2-VL's M-RoPE [3, 1, T]
    cos, sin = lm.rotary_emb(x[None], positions[None] if positions.dim() == 1
                             else positions[:, None])
    q, k = apply_rotary_pos_emb(q[None], k[None], cos, sin)
    return q, k, v


def spans_of(is_image: Tensor, counts: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each image of ``counts`` tokens, in prompt order (``is_image`` [T]
    bool marks their tokens)."""
    cols = torch.nonzero(is_image).flatten().tolist()
    if len(cols) != sum(counts):
        raise ValueError(f"{len(cols)} image tokens for images of {counts} tokens")
    spans, at = [], 0
    for n in counts:
        spans.append((cols[at], cols[at + n - 1] + 1))
        at += n
    return spans


def _causal(query_rows: Tensor, key_rows: Tensor) -> Tensor:
    return key_rows[None, :] <= query_rows[:, None]


def _own_key(t: int, s: int, device) -> Tensor:
    """[t, s]: the last ``t`` keys are the queries' own (a token always sees itself)."""
    own = torch.zeros(t, s, dtype=torch.bool, device=device)
    own[torch.arange(t, device=device), torch.arange(s - t, s, device=device)] = True
    return own


def _as_mask(rows: Tensor, n: int) -> Tensor:
    mask = torch.zeros(n, dtype=torch.bool, device=rows.device)
    mask[rows] = True
    return mask
