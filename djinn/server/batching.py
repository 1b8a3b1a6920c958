"""Decode steps of different sessions, run as one forward.

A decode step ([rows, 1] new tokens on a KV cache of the caller's own) gives
up the device's turn and waits here. Whoever arrives while no step is being
led becomes the leader: it takes the turn, gathers every waiting step of
the same model (up to --max-batch rows), and runs them as one forward.
Steps that arrive while the device is busy wait for the next leader, so
under load batches form by themselves; a lone step waits at most
--batch-wait-us for company (default 0: not at all).

Caches are ragged: the batch left-pads every cache to the longest, masks
the padding out, and gives each row the position it would have alone.
After the forward, each caller's cache gets its own row's new keys and
values. Only plain growing caches are batched (transformers' DynamicCache
of DynamicLayers, on a model whose forward takes position_ids); any other
step runs alone, as it would without batching.

transformers' own continuous batching (`init_continuous_batching`) was
measured first and passed over: it generates on its own from whole
requests, so it cannot serve a caller's step-by-step loop on a cache the
caller holds; and on this CPU it made 219 tokens/s for 32 tiny-Llama
requests where one padded `generate` over the same 32 made 9,673.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import torch

if TYPE_CHECKING:
    from djinn.server.device import Device, Job
    from djinn.server.models import LoadedModel

log = logging.getLogger("djinn.server")

# Queue waits kept for the percentiles in server_stats.
_WAITS_KEPT: Final = 4096


@dataclass(eq=False)
class Step:
    """One decode step of one caller."""

    model: LoadedModel
    input_ids: torch.Tensor  # [rows, 1], on the device
    cache: Any  # a DynamicCache; grows by one position
    attention_mask: torch.Tensor | None  # [rows, cached + 1]
    position_ids: torch.Tensor | None  # [rows, 1]
    logits: torch.Tensor | None = None
    error: BaseException | None = None
    done: bool = False
    queued_at: float = field(default_factory=time.perf_counter)

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0])

    def outcome(self) -> torch.Tensor:
        if self.error is not None:
            raise self.error
        assert self.logits is not None
        return self.logits


def batchable(model: LoadedModel, input_ids: torch.Tensor, cache: Any) -> bool:
    """Whether a step can join a batch: one new token per row on a plain, non-empty cache."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    return (
        model.takes_positions
        and input_ids.dim() == 2
        and input_ids.shape[1] == 1
        and type(cache) is DynamicCache
        and bool(cache.layers)
        and all(type(layer) is DynamicLayer for layer in cache.layers)
        and cache.get_seq_length() > 0
    )


def takes_positions(module: torch.nn.Module) -> bool:
    return "position_ids" in inspect.signature(module.forward).parameters


class Batcher:
    """Where decode steps meet; see the module's docstring."""

    def __init__(self, device: Device, max_batch: int, wait_us: int, enabled: bool) -> None:
        self._device = device
        self._max_rows = max_batch
        self._wait_s = wait_us / 1e6
        self.enabled = enabled
        self._cond = threading.Condition()
        self._waiting: list[Step] = []
        self._leading = False
        self.sizes: Counter[int] = Counter()  # rows per forward -> forwards
        self.waits: deque[float] = deque(maxlen=_WAITS_KEPT)
        self.tokens = 0

    def run(self, job: Job, step: Step) -> torch.Tensor:
        """The step's logits [rows, 1, vocab]. Called holding the turn; gives it up while
        the step waits for its batch."""
        if not self.enabled:  # the serial path: the turn goes round between steps
            self._device.pause(job)  # before the step: a job told to stop grows no cache
            self._execute([step])
            return step.outcome()
        if not (self._wait_s or self._waiting or self._device.turn.contended):
            self._execute([step])  # nobody to wait for: no hand-over of the turn
            return step.outcome()
        with self._device.released():
            with self._cond:
                self._waiting.append(step)
                while self._leading and not step.done:
                    self._cond.wait()
                if step.done:
                    return step.outcome()
                self._leading = True
            try:
                self._lead(step)
            finally:
                with self._cond:
                    self._leading = False
                    self._cond.notify_all()
        job.check()
        return step.outcome()

    def _lead(self, step: Step) -> None:
        self._device.turn.acquire()
        try:
            if self._wait_s:
                with self._cond:
                    if sum(s.rows for s in self._waiting) < self._max_rows:
                        self._cond.wait(self._wait_s)
            with self._cond:
                batch = self._take(step)
            self._execute(batch)
        finally:
            self._device.turn.release()

    def _take(self, first: Step) -> list[Step]:
        """`first`, and the waiting steps of the same model, up to the row limit."""
        batch, rows, rest = [first], first.rows, []
        for other in self._waiting:
            if other is first:
                continue
            if other.model is first.model and rows + other.rows <= self._max_rows:
                batch.append(other)
                rows += other.rows
            else:
                rest.append(other)
        self._waiting = rest
        return batch

    def _execute(self, batch: list[Step]) -> None:
        started = time.perf_counter()
        for step in batch:
            self.waits.append(started - step.queued_at)
        rows = sum(step.rows for step in batch)
        try:
            if len(batch) == 1:
                _alone(batch[0])
            else:
                _together(batch)
        except BaseException as exc:
            for step in batch:
                step.error = exc
        finally:
            for step in batch:
                step.done = True
            self.sizes[rows] += 1
            self.tokens += rows

    def stats(self) -> dict[str, Any]:
        waits = sorted(self.waits)
        forwards = sum(self.sizes.values())
        return {
            "batching": self.enabled,
            "batch_sizes": dict(sorted(self.sizes.items())),
            "batch_mean_rows": self.tokens / forwards if forwards else 0.0,
            "decode_tokens": self.tokens,
            "queue_wait_p50_ms": _quantile(waits, 0.5) * 1e3,
            "queue_wait_p99_ms": _quantile(waits, 0.99) * 1e3,
        }


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def _alone(step: Step) -> None:
    decode, cached = step.model.decode, step.cache.get_seq_length()
    if decode is not None and decode.takes(step.rows, cached):
        try:
            step.logits = decode(step.input_ids, step.cache, step.attention_mask, step.position_ids)
            return
        except Exception as exc:
            if step.cache.get_seq_length() != cached:  # it failed running: the cache grew
                raise
            # it failed compiling (a new input form): the model serves eager from now on
            step.model.decode = None
            name = step.model.fingerprint[:12]
            log.warning("model %s: compiled step failed, serving eager: %s", name, exc)
    kwargs: dict[str, Any] = {"use_cache": True, step.model.cache_arg: step.cache}
    if step.attention_mask is not None:
        kwargs["attention_mask"] = step.attention_mask
    if step.position_ids is not None:
        kwargs["position_ids"] = step.position_ids
    out = step.model.module(input_ids=step.input_ids, **kwargs)
    step.logits = out.logits


def _together(batch: list[Step]) -> None:
    """One forward for all steps, on left-padded copies of their caches."""
    from transformers import DynamicCache

    lengths = [step.cache.get_seq_length() for step in batch]
    longest = max(lengths)
    first = batch[0].cache
    layers = []
    for index in range(len(first.layers)):
        keys, values = [], []
        for step, length in zip(batch, lengths, strict=True):
            layer = step.cache.layers[index]  # keys: [rows, heads, length, dim]
            pad = (0, 0, longest - length, 0)
            keys.append(torch.nn.functional.pad(layer.keys, pad))
            values.append(torch.nn.functional.pad(layer.values, pad))
        layers.append((torch.cat(keys), torch.cat(values)))
    joint = DynamicCache(ddp_cache_data=layers)
    device = batch[0].input_ids.device
    masks, positions = [], []
    for step, length in zip(batch, lengths, strict=True):
        own = step.attention_mask
        if own is None:
            own = torch.ones(step.rows, length + 1, dtype=torch.long, device=device)
        masks.append(torch.nn.functional.pad(own.to(torch.long), (longest - length, 0)))
        if step.position_ids is not None:
            positions.append(step.position_ids.to(torch.long))
        else:  # what the model takes alone: the position after its cache
            positions.append(torch.full((step.rows, 1), length, dtype=torch.long, device=device))
    model = batch[0].model
    out = model.module(
        input_ids=torch.cat([step.input_ids for step in batch]),
        attention_mask=torch.cat(masks),
        position_ids=torch.cat(positions),
        use_cache=True,
        **{model.cache_arg: joint},
    )
    row = 0
    grown: list[Any] = list(joint.layers)  # DynamicLayers, as batchable() made sure
    for step in batch:
        rows = slice(row, row + step.rows)
        for own_layer, joint_layer in zip(step.cache.layers, grown, strict=True):
            own_layer.update(joint_layer.keys[rows, :, -1:], joint_layer.values[rows, :, -1:])
        step.logits = out.logits[rows].clone()  # its own storage, not a view of the batch's
        row += step.rows
