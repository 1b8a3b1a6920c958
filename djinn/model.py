"""RemoteModel: a model that runs on a djinn server and is called like the local one.

Every call asks the session's policy, value by value, whether bytes or a
reference should cross the wire, and records the answer. Under the default
`full` policy a decode step sends a token and gets back references: the
KV cache never leaves the server and the logits stay there until read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import torch

from djinn.client import DEFAULT_TIMEOUT, Client, connect
from djinn.errors import UsageError
from djinn.generation import GenerationParams, eos_ids, generate
from djinn.kvcache import Layers, cache_from_layers, cache_layers, cache_length
from djinn.net.payload import Ref
from djinn.net.rpc import Meter
from djinn.registration import describe, register
from djinn.semantics import (
    SMALL_VALUE_BYTES,
    Decision,
    DecisionRecord,
    Lifecycle,
    Policy,
    Value,
    detect_phase,
    get_policy,
)
from djinn.session import RemoteSession
from djinn.tensor import RemoteCache, RemoteTensor
from djinn.tree import map_tree

_D, _R = Decision.DATA, Decision.REFERENCE
# A plain module's outputs that may stay on the server per call; more come back as data.
_MODULE_OUTPUT_REFS: Final = 16

# nn.Module methods that would act on a local copy that does not exist.
_LOCAL_ONLY: Final = {
    "parameters": "its weights live on the server; use the model you wrapped",
    "named_parameters": "its weights live on the server; use the model you wrapped",
    "buffers": "its buffers live on the server; use the model you wrapped",
    "state_dict": "its weights live on the server; use the model you wrapped",
    "load_state_dict": "load the weights into the local model and wrap it again",
    "to": "the server decides placement: start it with --device/--dtype",
    "cuda": "the server decides placement: start it with --device",
    "cpu": "the server decides placement: start it with --device",
    "half": "start the server with --dtype float16",
    "bfloat16": "start the server with --dtype bfloat16",
    "float": "start the server with --dtype float32",
    "train": "a RemoteModel runs inference only",
    "requires_grad_": "a RemoteModel runs inference only",
    "zero_grad": "a RemoteModel runs inference only",
}


@dataclass
class RemoteOutput:
    """What a call returns: `logits`, and the cache as `past_key_values` (alias `cache`)."""

    logits: torch.Tensor | RemoteTensor | None
    past_key_values: Any = None

    @property
    def cache(self) -> Any:
        return self.past_key_values


@dataclass(frozen=True)
class _Facts:
    """What the client knows of the model without asking: enough to plan a call."""

    vocab_size: int
    logits_dtype: torch.dtype
    max_positions: int | None
    eos_token_id: tuple[int, ...]
    pad_token_id: int | None

    @classmethod
    def of(cls, model: torch.nn.Module, server_dtype: str) -> _Facts:
        output_embeddings = getattr(model, "get_output_embeddings", None)
        head = output_embeddings() if callable(output_embeddings) else None
        vocab = getattr(head, "out_features", None) or getattr(
            getattr(model, "config", None), "vocab_size", 0
        )
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        if server_dtype != "auto":
            dtype = getattr(torch, server_dtype)
        generation = getattr(model, "generation_config", None)
        positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        return cls(
            vocab_size=int(vocab or 0),
            logits_dtype=dtype,
            max_positions=positions if isinstance(positions, int) else None,
            eos_token_id=eos_ids(getattr(generation, "eos_token_id", None)),
            pad_token_id=getattr(generation, "pad_token_id", None),
        )


class RemoteModel:
    """A model held by a djinn server, called like the local model.

        rm = RemoteModel(model, server="127.0.0.1:5556", policy="full")
        out = rm(input_ids)                      # out.logits, out.past_key_values
        out = rm(next_ids, past_key_values=out.past_key_values)
        ids = rm.generate(input_ids, max_new_tokens=50)
        rm.stats(); rm.close()

    `server` is an address or a connected `Client` (shared, left open on
    close). Registration uploads the weights only if the server lacks them.
    Raises UsageError (bad arguments, unknown policy), RemoteCodeRefusedError
    (a plain nn.Module on a server without --trust-remote-code), and the
    connection errors of `connect`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        server: str | tuple[str, int] | Client = "127.0.0.1:5556",
        policy: str | Policy = "full",
        token: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.policy = get_policy(policy)
        if isinstance(server, Client):
            self._client, self._owns_client = server, False
        else:
            self._client, self._owns_client = connect(server, token=token, timeout=timeout), True
        self._meter = Meter()
        try:
            spec, tensors = describe(model)
            uploaded = register(self._client, spec, tensors, self._meter)
            self._session = RemoteSession(
                self._client, spec["fingerprint"], self._meter, self.policy
            )
        except BaseException:
            if self._owns_client:
                self._client.close()
            raise
        self.fingerprint: str = spec["fingerprint"]
        self._is_lm = spec["kind"] == "transformers" and hasattr(model, "get_output_embeddings")
        self._facts = _Facts.of(model, str(self._client.server_info.get("dtype", "auto")))
        weight_bytes = sum(t.nbytes for t in tensors.values())
        self._record("register", "weights", Lifecycle.WEIGHT, _D if uploaded else _R, uploaded)
        self.uploaded_bytes = uploaded
        self.weight_bytes = weight_bytes

    # -- calls ---------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """One forward pass, like the local model's.

        A causal LM takes (input_ids, past_key_values=None, use_cache=True,
        attention_mask=None, *, cache=None) and returns a RemoteOutput. A
        plain module takes its own arguments and returns its own outputs,
        large ones as RemoteTensors where the policy keeps outputs remote.
        """
        if self._is_lm:
            return self._lm_call(*args, **kwargs)
        return self._module_call(args, kwargs)

    def _lm_call(
        self,
        input_ids: Any = None,
        past_key_values: Any = None,
        use_cache: bool = True,
        attention_mask: Any = None,
        *,
        cache: Any = None,
        **kwargs: Any,
    ) -> RemoteOutput:
        if kwargs:
            raise UsageError(
                f"cannot pass {', '.join(sorted(kwargs))}: RemoteModel takes input_ids, "
                "past_key_values (or cache), use_cache and attention_mask"
            )
        if cache is not None and past_key_values is not None:
            raise UsageError("cannot take two caches: pass past_key_values or cache, not both")
        return self._forward(
            input_ids, cache if cache is not None else past_key_values, use_cache, attention_mask
        )

    def _module_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        def to_wire(value: Any) -> Any:
            if isinstance(value, RemoteTensor):
                value._check_session(self._session, "an argument")
                return value.ref
            return value

        keep = self._decide("output", Lifecycle.OUTPUT, SMALL_VALUE_BYTES + 1, detect_phase(0))
        keep_over = SMALL_VALUE_BYTES if keep is _R else 2**63 - 1
        ref_ids = [self._session.new_ref().id for _ in range(_MODULE_OUTPUT_REFS)]
        out, kept = self._session.call(
            "call", map_tree(args, to_wire), map_tree(kwargs, to_wire), keep_over, ref_ids
        )

        def from_wire(value: Any) -> Any:
            if isinstance(value, Ref):
                shape, dtype = kept[value.id]
                self._record("call", "output", Lifecycle.OUTPUT, _R, 0)
                return RemoteTensor(self._session, value, shape, dtype)
            if isinstance(value, torch.Tensor):
                self._record("call", "output", Lifecycle.OUTPUT, _D, value.nbytes)
            return value

        self._session.flush()
        return map_tree(out, from_wire)

    forward = __call__

    def _forward(
        self, input_ids: Any, cache: Any, use_cache: bool, attention_mask: Any
    ) -> RemoteOutput:
        ids = self._input(input_ids, "input_ids")
        mask = None if attention_mask is None else self._input(attention_mask, "attention_mask")
        if isinstance(cache, RemoteCache):
            cache._check_session(self._session, "a KV cache")
        batch, seq = ids.shape
        phase = detect_phase(cache_length(cache))
        row = batch * self._facts.vocab_size * self._facts.logits_dtype.itemsize
        last = self._decide("logits[:, -1]", Lifecycle.OUTPUT, row, phase)
        rest = (
            self._decide("logits[:, :-1]", Lifecycle.ACTIVATION, row * (seq - 1), phase)
            if seq > 1
            else _D
        )
        logits_mode = "ref" if last is _R else ("all" if rest is _D else "last")
        kept = self._decide("past_key_values", Lifecycle.SESSION_STATE, 0, phase)
        cache_mode = "none" if not use_cache else ("ref" if kept is _R else "data")

        logits_ref = self._session.new_ref()
        held = isinstance(cache, RemoteCache)  # on the server already
        cache_ref = cache.ref if held else self._session.new_ref()
        sent_layers = None if held or cache is None else cache_layers(cache)
        cache_wire = cache.ref if held else sent_layers
        ids_wire = ids.ref if isinstance(ids, RemoteTensor) else ids
        mask_wire = mask.ref if isinstance(mask, RemoteTensor) else mask
        self._record_input("forward", "input_ids", ids)
        if cache is not None:
            sent = _nbytes(sent_layers)
            decision = _R if held else _D
            self._record("forward", "past_key_values", Lifecycle.SESSION_STATE, decision, sent)
        if logits_mode == "ref" and cache_mode != "data":
            # Nothing comes back: queue it with the work that will read its results.
            self._check_ids(ids, cache_length(cache))
            self._session.enqueue(
                (
                    "forward",
                    ids_wire,
                    cache_wire,
                    mask_wire,
                    logits_ref.id,
                    cache_ref.id,
                    use_cache,
                ),
                "forward",
            )
            logits: Any = (
                (batch, seq, self._facts.vocab_size),
                self._facts.logits_dtype,
            )
            layers, length = None, cache_length(cache) + seq
        else:
            logits, layers, length = self._session.call(
                "forward",
                ids_wire,
                cache_wire,
                mask_wire,
                (logits_mode, logits_ref.id, cache_mode, cache_ref.id),
            )
        if logits_mode == "ref":
            shape, dtype = logits
            logits = RemoteTensor(self._session, logits_ref, shape, dtype)
            self._record("forward", "logits", Lifecycle.OUTPUT, _R, 0)
        else:
            self._record("forward", "logits", Lifecycle.OUTPUT, _D, logits.nbytes)
        out_cache: Any = None
        if cache_mode == "ref":
            if isinstance(cache, RemoteCache):
                cache._update(length)
                out_cache = cache
            else:
                out_cache = RemoteCache(self._session, cache_ref, length)
            self._record("forward", "past_key_values", Lifecycle.SESSION_STATE, _R, 0)
        elif cache_mode == "data":
            out_cache = None if layers is None else cache_from_layers(layers)
            self._record("forward", "past_key_values", Lifecycle.SESSION_STATE, _D, _nbytes(layers))
        self._session.flush()
        return RemoteOutput(logits, out_cache)

    def _check_ids(self, ids: torch.Tensor | RemoteTensor, cached: int) -> None:
        """The server's checks, made here for a call that is only queued, so a bad
        input still fails at the line that passed it."""
        if isinstance(ids, torch.Tensor):
            if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
                raise UsageError(
                    f"cannot run the model: input_ids must be integers, got {ids.dtype}"
                )
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self._facts.vocab_size):
                raise UsageError(
                    f"cannot run the model: input_ids holds a token outside the vocabulary "
                    f"[0, {self._facts.vocab_size})"
                )
        limit = self._facts.max_positions
        if limit is not None and cached + ids.shape[1] > limit:
            raise UsageError(
                f"cannot run the model: {cached} cached + {ids.shape[1]} new tokens exceed "
                f"its {limit} positions"
            )

    def generate(
        self,
        input_ids: Any,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        attention_mask: Any = None,
        seed: int = 0,
    ) -> torch.Tensor:
        """Prompt plus new tokens, [batch, prompt + new], as model.generate returns them.

        Greedy (do_sample=False) gives exactly the local model's tokens. Where
        the policy keeps outputs on the server (full), the whole loop runs
        there and one call returns the new tokens; otherwise the client drives
        it, step by step, with what the policy ships. Sampling is seeded by `seed`.
        """
        if not self._is_lm:
            raise UsageError("cannot generate: this RemoteModel wraps a plain nn.Module")
        params = GenerationParams(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_token_id=eos_ids(eos_token_id)
            if eos_token_id is not None
            else self._facts.eos_token_id,
            pad_token_id=pad_token_id if pad_token_id is not None else self._facts.pad_token_id,
            seed=seed,
        )
        params.check_pad(self._facts.vocab_size)
        ids = self._input(input_ids, "input_ids")
        if isinstance(ids, RemoteTensor):
            ids = ids.cpu()
        mask = None if attention_mask is None else self._input(attention_mask, "attention_mask")
        if isinstance(mask, RemoteTensor):
            mask = mask.cpu()
        row = ids.shape[0] * self._facts.vocab_size * self._facts.logits_dtype.itemsize
        if self._decide("logits[:, -1]", Lifecycle.OUTPUT, row, detect_phase(0)) is _R:
            new = self._session.call("generate", ids, mask, params.to_wire())
            self._record_input("generate", "input_ids", ids)
            self._record("generate", "past_key_values", Lifecycle.SESSION_STATE, _R, 0)
            self._record("generate", "logits", Lifecycle.ACTIVATION, _R, 0)
            self._record("generate", "tokens", Lifecycle.OUTPUT, _D, new.nbytes)
            return torch.cat([ids, new.to(ids.dtype)], dim=-1)

        def step(
            tokens: torch.Tensor, cache: Any, m: torch.Tensor | None
        ) -> tuple[torch.Tensor, Any]:
            out = self._forward(tokens, cache, True, m)
            assert isinstance(out.logits, torch.Tensor)
            return out.logits[:, -1, :], out.past_key_values

        return generate(step, ids, params, mask)

    # -- inputs, decisions ------------------------------------------------------------

    def _input(self, value: Any, name: str) -> torch.Tensor | RemoteTensor:
        if isinstance(value, RemoteTensor):
            value._check_session(self._session, name)
            tensor: Any = value
        elif isinstance(value, torch.Tensor):
            tensor = value.detach()
        elif isinstance(value, (list, tuple)):
            tensor = torch.tensor(value)
        else:
            raise UsageError(f"cannot use {name} of type {type(value).__name__}: pass a tensor")
        if tensor.dim() != 2:
            raise UsageError(
                f"cannot use {name} of shape {list(tensor.shape)}: expected [batch, seq]"
            )
        return tensor  # type: ignore[no-any-return]

    def _decide(self, name: str, lifecycle: Lifecycle, nbytes: int, phase: Any) -> Decision:
        return self.policy.decide(Value(name, lifecycle, nbytes, phase, on_server=True))

    def _record(
        self, op: str, value: str, lifecycle: Lifecycle, decision: Decision, nbytes: int
    ) -> None:
        self._session.record(DecisionRecord(op, value, lifecycle, decision, nbytes))

    def _record_input(self, op: str, name: str, value: torch.Tensor | RemoteTensor) -> None:
        if isinstance(value, RemoteTensor):
            self._record(op, name, Lifecycle.ACTIVATION, _R, 0)
        else:
            self._record(op, name, Lifecycle.ACTIVATION, _D, value.nbytes)

    def synchronize(self) -> None:
        """Run queued work now (as torch.cuda.synchronize does for a GPU): its errors
        surface here, and server memory reflects it."""
        self._session.call("run")

    # -- bookkeeping --------------------------------------------------------------------

    @property
    def decisions(self) -> list[DecisionRecord]:
        """The recent decisions, oldest first: (op, value, lifecycle, decision, bytes)."""
        return list(self._session.decisions)

    def stats(self) -> dict[str, Any]:
        """This model's traffic on the wire (headers included) and where its bytes went."""
        return {
            "policy": self.policy.name,
            "bytes_sent": self._meter.bytes_sent,
            "bytes_received": self._meter.bytes_received,
            "calls": self._meter.calls,
            "weight_bytes": self.weight_bytes,
            "uploaded_bytes": self.uploaded_bytes,
            "by_lifecycle": self._session.decisions.by_lifecycle(),
        }

    def close(self) -> None:
        """Free this model's server-side state (and the connection, if it opened one)."""
        self._session.close()
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> RemoteModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def eval(self) -> RemoteModel:
        """A no-op: the server runs the model in eval mode already."""
        return self

    def __getattr__(self, name: str) -> Any:
        if name in _LOCAL_ONLY:
            raise UsageError(f"cannot call {name}() on a RemoteModel: {_LOCAL_ONLY[name]}")
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __repr__(self) -> str:
        return (
            f"RemoteModel({self.fingerprint[:12]}, server={self._client.address}, "
            f"policy={self.policy.name})"
        )


def _nbytes(layers: Layers | None) -> int:
    return sum(k.nbytes + v.nbytes for k, v in layers or [])
