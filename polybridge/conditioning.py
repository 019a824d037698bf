"""The one conditioning contract: what every source of conditioning gives the UNet, and the one place that composes it.

Every source of conditioning produces a :class:`Conditioning` for some rows of the batch:

- the backbone's prompt encoding (its family's ``encode_prompt``): the cross-attention ``context`` of its text
  encoder(s), and for SDXL the pooled text embedding in ``added`` (``text_embeds``);
- the backbone family's size conditioning (SDXL's ``time_ids``, in ``added``);
- a ``bdm`` branch: ``down`` / ``mid`` residuals (ControlNet-style);
- a ``pea`` branch: a ``context`` from its adapter (and on SDXL a pooled ``text_embeds``);
- plugins (ControlNet residuals, ...) next.

:func:`compose` turns a list of them into one full-batch ``Conditioning``, and :meth:`Conditioning.unet_kwargs`
into the UNet's keyword arguments. The pipeline and the trainer both call it; nothing else combines conditioning.
The rules, per row:

- **context**: the contexts of the sources that cover the row follow each other, in the order of the list
  (rows of different lengths are zero-padded and the padding masked out). A source marked ``optional`` on a row
  (the backbone's encoding of an empty English prompt) only fills in: it is used where no other source gives that
  row a context. So a pea branch replaces the backbone's ``""`` context, and is followed by the backbone's states
  of an English prompt when there is one.
- **added conditioning** (``added_cond_kwargs``): per key, the mean of the non-optional sources that give it on the
  row; the optional ones only where none does.
- **residuals**: summed over the sources that give them (two native languages on one row sum, as diffusers'
  MultiControlNet does).

Where one full-batch source is all a row sees, its tensor is passed on as it is (no copy), so composing a single
source is exactly that source, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch


@dataclass
class Conditioning:
    """What one source of conditioning gives the UNet, for the rows ``rows`` of the batch (``None``: all rows).

    Tensors have one leading entry per covered row. ``optional`` (a bool, or one bool per covered row) marks the
    source's context and added conditioning as a default that other sources replace (see the module doc)."""

    context: torch.Tensor | None = None  # (r, L, C): cross-attention states
    context_mask: torch.Tensor | None = None  # (r, L): 1 on tokens to attend to; None: all
    added: Mapping[str, torch.Tensor] = field(default_factory=dict)  # added_cond_kwargs, each (r, ...)
    down: tuple[torch.Tensor, ...] | None = None  # down-block residuals, each (r, C, h, w)
    mid: torch.Tensor | None = None  # mid-block residual (r, C, h, w)
    rows: torch.Tensor | None = None  # (r,) int64 indices into the batch; None: every row, in order
    optional: bool | torch.Tensor = False

    # ------------------------------------------------------------------ views

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Conditioning:
        """The same conditioning with its floating-point tensors in ``dtype`` / on ``device`` (rows and masks only
        move)."""
        def cast(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return replace(
            self, context=cast(self.context), context_mask=cast(self.context_mask),
            added={k: cast(v) for k, v in self.added.items()},
            down=None if self.down is None else tuple(cast(r) for r in self.down), mid=cast(self.mid),
            rows=None if self.rows is None else self.rows.to(device=device),
            optional=self.optional.to(device=device) if torch.is_tensor(self.optional) else self.optional)

    def select(self, rows: torch.Tensor | None) -> Conditioning:
        """The full-batch conditioning's entries of ``rows`` (``None``: all), e.g. the added conditioning a branch
        that runs on some rows only reads."""
        if rows is None:
            return self
        if self.rows is not None:
            raise ValueError("select() takes a full-batch conditioning (rows=None); compose() makes one")

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.index_select(0, rows.to(t.device))

        return Conditioning(context=pick(self.context), context_mask=pick(self.context_mask),
                            added={k: pick(v) for k, v in self.added.items()},
                            down=None if self.down is None else tuple(pick(r) for r in self.down), mid=pick(self.mid),
                            optional=pick(self.optional) if torch.is_tensor(self.optional) else self.optional)

    def unet_kwargs(self) -> dict[str, Any]:
        """The UNet's keyword arguments (besides sample and timestep) for a full-batch conditioning."""
        if self.rows is not None:
            raise ValueError("unet_kwargs() takes a full-batch conditioning (rows=None); compose() makes one")
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.context}
        if self.context_mask is not None:
            kwargs["encoder_attention_mask"] = self.context_mask
        if self.added:
            kwargs["added_cond_kwargs"] = dict(self.added)
        if self.down is not None:
            kwargs["down_block_additional_residuals"] = tuple(self.down)
        if self.mid is not None:
            kwargs["mid_block_additional_residual"] = self.mid
        return kwargs

    def _row_flags(self, n: int) -> list[bool]:
        if torch.is_tensor(self.optional):
            return [bool(v) for v in self.optional.tolist()]
        return [bool(self.optional)] * n

    def _row_list(self, batch: int) -> list[int]:
        return list(range(batch)) if self.rows is None else [int(r) for r in self.rows.tolist()]


def compose(parts: Iterable[Conditioning | None], batch_size: int) -> Conditioning:
    """One full-batch conditioning from ``parts`` (``None`` entries are skipped), by the rules of the module doc."""
    parts = [p for p in parts if p is not None]
    context, mask = _compose_context(parts, batch_size)
    return Conditioning(context=context, context_mask=mask, added=_compose_added(parts, batch_size),
                        down=_compose_down(parts, batch_size), mid=_compose_mid(parts, batch_size))


# --------------------------------------------------------------------------- the rules


def _used(parts: Sequence[Conditioning], batch: int, has: Any) -> list[list[tuple[Conditioning, int]]]:
    """Per row: the (source, its entry index) whose contribution the row takes, for what ``has`` selects; optional
    contributions only where no non-optional one covers the row."""
    strong: list[list[tuple[Conditioning, int]]] = [[] for _ in range(batch)]
    weak: list[list[tuple[Conditioning, int]]] = [[] for _ in range(batch)]
    for part in parts:
        if not has(part):
            continue
        rows = part._row_list(batch)
        for j, (row, optional) in enumerate(zip(rows, part._row_flags(len(rows)), strict=True)):
            if not 0 <= row < batch:
                raise ValueError(f"conditioning row {row} is outside the batch of {batch}")
            (weak if optional else strong)[row].append((part, j))
    return [s or w for s, w in zip(strong, weak)]


def _only_full(used: list[list[tuple[Conditioning, int]]]) -> Conditioning | None:
    """The single full-batch source every row takes its one contribution from, if that is the case."""
    first = used[0][0][0] if used and len(used[0]) == 1 else None
    if first is None or first.rows is not None:
        return None
    if all(len(u) == 1 and u[0][0] is first and u[0][1] == row for row, u in enumerate(used)):
        return first
    return None


def _compose_context(parts: Sequence[Conditioning], batch: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    used = _used(parts, batch, lambda p: p.context is not None)
    if not any(used):
        return None, None
    only = _only_full(used)
    if only is not None:
        return only.context, only.context_mask
    missing = [row for row, u in enumerate(used) if not u]
    if missing:
        raise ValueError(f"rows {missing[:8]} have no context: every row needs the backbone's prompt encoding or a "
                         "source that replaces it")
    ref = next(u[0][0].context for u in used if u)
    lengths = [sum(p.context.shape[1] for p, _ in u) for u in used]
    out = ref.new_zeros((batch, max(lengths), ref.shape[-1]))
    mask = torch.zeros((batch, max(lengths)), dtype=torch.long, device=ref.device)
    for row, contributions in enumerate(used):
        at = 0
        for part, j in contributions:
            piece = part.context[j]
            out[row, at:at + piece.shape[0]] = piece.to(out.dtype)
            mask[row, at:at + piece.shape[0]] = 1 if part.context_mask is None else part.context_mask[j].to(mask.device)
            at += piece.shape[0]
    return out, (None if bool(mask.all()) else mask)


def _compose_added(parts: Sequence[Conditioning], batch: int) -> dict[str, torch.Tensor]:
    keys = list(dict.fromkeys(k for p in parts for k in p.added))
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        used = _used(parts, batch, lambda p, key=key: key in p.added)
        missing = [row for row, u in enumerate(used) if not u]
        if missing:
            raise ValueError(f"added conditioning {key!r}: rows {missing[:8]} have none")
        only = _only_full(used)
        if only is not None:
            out[key] = only.added[key]
            continue
        ref = used[0][0][0].added[key]
        out[key] = torch.stack([torch.stack([p.added[key][j].to(ref.dtype) for p, j in u]).mean(0) for u in used])
    return out


def _sum_rows(pieces: list[tuple[Conditioning, torch.Tensor]], batch: int) -> torch.Tensor | None:
    acc: torch.Tensor | None = None
    for part, value in pieces:
        if part.rows is None:
            acc = value if acc is None else acc + value
            continue
        if acc is None:
            acc = torch.zeros((batch, *value.shape[1:]), dtype=value.dtype, device=value.device)
        acc = acc.index_add(0, part.rows.to(acc.device), value.to(acc.dtype))
    return acc


def _compose_down(parts: Sequence[Conditioning], batch: int) -> tuple[torch.Tensor, ...] | None:
    givers = [p for p in parts if p.down is not None]
    if not givers:
        return None
    n = len(givers[0].down)
    if any(len(p.down) != n for p in givers):
        raise ValueError(f"down residuals of different depths: {sorted({len(p.down) for p in givers})}")
    return tuple(_sum_rows([(p, p.down[i]) for p in givers], batch) for i in range(n))


def _compose_mid(parts: Sequence[Conditioning], batch: int) -> torch.Tensor | None:
    return _sum_rows([(p, p.mid) for p in parts if p.mid is not None], batch)


def concat(parts: Sequence[Conditioning]) -> Conditioning:
    """Full-batch conditionings of consecutive batch parts (e.g. classifier-free guidance's negative rows, then the
    positive ones) as one. Only what the backbone's encoding gives (context, added, optional) is joined."""
    if any(p.rows is not None or p.down is not None or p.mid is not None or p.context_mask is not None for p in parts):
        raise ValueError("concat() joins full-batch prompt encodings (no rows, residuals or context masks)")
    first = parts[0]
    flags = [p.optional if torch.is_tensor(p.optional) else
             torch.full((p.context.shape[0],), bool(p.optional), dtype=torch.bool, device=p.context.device)
             for p in parts]
    return Conditioning(context=torch.cat([p.context for p in parts]),
                        added={k: torch.cat([p.added[k] for p in parts]) for k in first.added},
                        optional=torch.cat(flags))
