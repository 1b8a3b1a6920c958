"""RemoteModel: a model that runs on a djinn server and is called like the local one.

Every call is described to the planner (djinn.semantics), which places each
value as data or reference and records why; this module carries the plan
out. Under the default `full` policy a decode step sends a token and gets
back references: the KV cache never leaves the server and the logits stay
there until read. `generate` runs transformers' own generate on the server
(djinn.remote_generate builds its arguments).
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import os
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any, Final

import torch

from djinn import messages
from djinn.checkpoint import Folder, fingerprinted, read_folder, user_cache, weights
from djinn.client import DEFAULT_TIMEOUT, Client, connect
from djinn.cluster import Router, is_cluster
from djinn.errors import ConnectionLostError, DjinnTimeoutError, ReplayError, UsageError
from djinn.kvcache import cache_from_layers, cache_layers, cache_length
from djinn.modelfacts import ModelFacts, check_labels, check_mask, check_positions
from djinn.net.codec import Ref, wire_value
from djinn.net.core import Meter
from djinn.registration import WeightWatch, describe, register, transformers_class
from djinn.remote_generate import GenerateCall
from djinn.semantics import (
    Call,
    DecisionRecord,
    Lifecycle,
    Plan,
    Policy,
    Side,
    Value,
    detect_phase,
    get_policy,
    plan,
)
from djinn.session import RemoteSession
from djinn.tensor import RemoteCache, RemoteTensor, remote_tree
from djinn.tree import map_tree

log = logging.getLogger("djinn")

# Forward arguments a RemoteModel takes, as a transformers causal LM names them.
FORWARD_ARGS: Final = (
    "input_ids",
    "attention_mask",
    "position_ids",
    "past_key_values",
    "cache",
    "inputs_embeds",
    "labels",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "logits_to_keep",
)
_NAMED: Final = frozenset(FORWARD_ARGS)
# nn.Module methods that would act on a local copy that does not exist.
_LOCAL_ONLY: Final = {
    "parameters": "its weights live on the server; use the model you wrapped",
    "named_parameters": "its weights live on the server; use the model you wrapped",
    "buffers": "its buffers live on the server; use the model you wrapped",
    "state_dict": "its weights live on the server; use the model you wrapped",
    "load_state_dict": "load the weights into the local model and wrap it again",
    "requires_grad_": "a RemoteModel runs inference only",
    "zero_grad": "a RemoteModel runs inference only",
    "backward": "a RemoteModel runs inference only",
}
# Placement methods: the server decides placement, so these leave the model as it is.
_PLACEMENT: Final = ("to", "cuda", "cpu", "half", "float", "bfloat16", "double")
# How long a session on a cluster waits for a server to resume on, and between tries.
RECOVER_S: Final = 30.0
RETRY_S: Final = 0.2


class RemoteModel:
    """A model held by a djinn server, called like the local one.

        rm = RemoteModel(model, server="127.0.0.1:5556", policy="full")
        out = rm(input_ids)                      # out.logits, out.past_key_values
        out = rm(next_ids, past_key_values=out.past_key_values)
        ids = rm.generate(input_ids, max_new_tokens=50)
        for tokens in rm.stream(input_ids, max_new_tokens=50): ...
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
        recover_s: float | None = None,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise UsageError(
                f"cannot wrap a {type(model).__name__}: RemoteModel takes a transformers model "
                "or another torch.nn.Module (or use RemoteModel.from_pretrained(folder))"
            )
        self._local: torch.nn.Module | None = model
        self._stand_in(
            type(model),
            getattr(model, "config", None),
            getattr(model, "generation_config", None),
            transformers_class(model) is not None,
            getattr(model, "name_or_path", "") or "",
        )
        key = describe(model)[0].fingerprint if is_cluster(server) else None
        self._open(server, policy, token, timeout, key, recover_s)
        self._guarded(lambda: self._attach(model))

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        server: str | tuple[str, int] | Client = "127.0.0.1:5556",
        policy: str | Policy = "full",
        token: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        recover_s: float | None = None,
    ) -> RemoteModel:
        """A model the client never builds: a local folder (config.json and safetensors
        shards) is fingerprinted from its files (remembered by path, size and mtime, so
        a second attach reads nothing) and uploaded from them only if the server lacks
        it, a shard at a time; any other name is one the server holds (`--model
        NAME=PATH`, see `Client.models()`). The client holds the config, never the
        weights. Raises UsageError for a bad folder, RemoteUsageError for an unknown
        name."""
        path = Path(name_or_path).expanduser()
        text = str(name_or_path)
        self = cls.__new__(cls)
        self._local = None
        if path.is_dir():
            folder = _fingerprinted(read_folder(path))
            self._open(server, policy, token, timeout, folder.spec.fingerprint, recover_s)
            self._guarded(lambda: self._attach_folder(folder))
        elif os.sep in text or text.startswith("."):
            raise UsageError(f"cannot attach {text}: no such folder")
        else:
            self._open(server, policy, token, timeout, text, recover_s)
            self._guarded(lambda: self._attach_name(text))
        return self

    def _open(
        self,
        server: str | tuple[str, int] | Client,
        policy: str | Policy,
        token: str | None,
        timeout: float,
        key: str | None,
        recover_s: float | None,
    ) -> None:
        """Connect: to `server`, or through a cluster's router to the best server for the
        model `key`. A lost server is survived for `recover_s` seconds (default: 30 on a
        cluster, where another server can take over; 0, fail at once, otherwise)."""
        self.policy = get_policy(policy)
        self._meter = Meter()
        self._token, self._timeout, self._key = token, timeout, key
        self._router = Router(server, token) if is_cluster(server) else None
        if recover_s is None:
            recover_s = RECOVER_S if self._router is not None else 0.0
        self._recover_s = recover_s
        if isinstance(server, Client):
            self._client, self._owns_client = server, False
        else:
            address = self._router.place(key) if self._router is not None else server
            self._client, self._owns_client = connect(address, token=token, timeout=timeout), True
        self._register_on: Callable[[Client], str] = lambda client: str(self._key)

    def _stand_in(
        self, cls: type, config: Any, generation: Any, transformers: bool, name_or_path: str
    ) -> None:
        """The attributes the ecosystem reads, from the model's class and config."""
        self._lm = transformers and hasattr(cls, "get_output_embeddings")
        self.config: Any = config
        self.generation_config: Any = copy.deepcopy(generation)
        self._registered_generation = copy.deepcopy(generation)
        self._facts = ModelFacts.of(config)
        self._signature = inspect.signature(cls.forward)  # type: ignore[attr-defined]
        self.name_or_path: str = name_or_path

    def _guarded(self, attach: Callable[[], RemoteSession]) -> None:
        try:
            self._session = attach()
        except BaseException:
            if self._owns_client:
                self._client.close()
            raise

    def _attach(self, model: torch.nn.Module) -> RemoteSession:
        spec, tensors = describe(model)
        names = [entry.name for entry in spec.manifest]

        def weights(start: int) -> Iterator[torch.Tensor]:
            return (tensors[name] for name in names[start:])

        sizes = [tensors[name].nbytes for name in names]
        self._watch = WeightWatch(model)
        return self._registered(spec, weights, sizes)

    def _attach_folder(self, folder: Folder) -> RemoteSession:
        import transformers

        spec = folder.spec
        generation = _generation(spec.generation_config)
        cls = getattr(transformers, spec.cls)
        self._stand_in(cls, folder.config, generation, True, str(folder.path))
        sizes = [span.nbytes for span in folder.spans]
        return self._registered(spec, lambda start: weights(folder, start), sizes)

    def _attach_name(self, name: str) -> RemoteSession:
        import transformers

        session = RemoteSession(
            self._client, name, self._meter, self.policy, describe=True, recover=self._recover()
        )
        card = session.card
        if card is None:
            raise UsageError(f"cannot attach {name!r}: the server sent no description of it")
        config = transformers.AutoConfig.for_model(**card.config)
        self._stand_in(
            getattr(transformers, card.cls), config, _generation(card.generation_config), True, name
        )
        assert session.fingerprint is not None
        self._record_register(session, session.fingerprint, 0, 0)
        return session

    def _registered(
        self,
        spec: messages.ModelSpec,
        weights: Callable[[int], Iterator[torch.Tensor]],
        sizes: list[int],
    ) -> RemoteSession:
        uploaded = register(self._client, spec, weights, sizes, self._meter)

        def register_on(client: Client) -> str:
            self.uploaded_bytes += register(client, spec, weights, sizes, self._meter)
            return spec.fingerprint

        self._register_on = register_on
        session = RemoteSession(
            self._client, spec.fingerprint, self._meter, self.policy, recover=self._recover()
        )
        self._record_register(session, spec.fingerprint, uploaded, sum(sizes))
        return session

    def _record_register(
        self, session: RemoteSession, fingerprint: str, uploaded: int, nbytes: int
    ) -> None:
        """What the attach moved, and the planner's record of where the weights are."""
        self.fingerprint: str = fingerprint
        self.uploaded_bytes = uploaded
        self.weight_bytes = nbytes
        side = Side.CLIENT if uploaded else Side.SERVER
        weights_value = Value("weights", Lifecycle.WEIGHT, nbytes, side)
        session.record(plan(Call("register", detect_phase(0), (weights_value,)), self.policy))

    # -- surviving a lost server -----------------------------------------------------------

    def _recover(self) -> Callable[[], tuple[Client, str]] | None:
        return self._reconnect if self._recover_s > 0 else None

    def _reconnect(self) -> tuple[Client, str]:
        """A server to resume on, the model registered there (uploaded if it lacks it):
        the same address again (a restarted server), or on a cluster the best other
        server. Retries for `recover_s` seconds; ReplayError past them."""
        deadline = time.monotonic() + self._recover_s
        lost = self._client.address
        while True:
            try:
                address = (
                    self._router.place(self._key, avoid=[lost])
                    if self._router is not None
                    else lost  # one server: the same address, restarted
                )
                client = connect(address, token=self._token, timeout=self._timeout)
                break
            except (ConnectionLostError, DjinnTimeoutError) as exc:
                if time.monotonic() >= deadline:
                    raise ReplayError(
                        f"cannot resume: no server answered within {self._recover_s:g} s ({exc})"
                    ) from exc
                time.sleep(RETRY_S)
        if self._owns_client:
            self._client.close()
        self._client, self._owns_client = client, True
        log.warning(
            "model %s: server %s lost; resuming on %s", self.fingerprint[:12], lost, address
        )
        return client, self._register_on(client)

    def _check_weights(self) -> None:
        """Weights edited in place after wrapping would be silently stale on the server:
        register them again (a new fingerprint, a new session)."""
        if self._local is None or not self._watch.changed():
            return
        log.info(
            "model %s: its local weights changed; registering them again", self.fingerprint[:12]
        )
        old = self._session
        self._session = self._attach(self._local)
        old.close()

    # -- what the ecosystem reads ----------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Where inputs to this model are made: the client's CPU (the server moves them)."""
        return torch.device("cpu")

    @property
    def server_device(self) -> torch.device:
        """The server's device, where the weights and RemoteTensors live."""
        return self._session.device

    @functools.cached_property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's weights on the server."""
        name = self._client.server_info.get("dtype", "auto")
        if name != "auto":
            return getattr(torch, name)  # type: ignore[no-any-return]
        return getattr(self.config, "dtype", None) or torch.float32

    main_input_name = "input_ids"

    def can_generate(self) -> bool:
        return self._lm

    def get_input_embeddings(self) -> Any:
        raise UsageError(
            "cannot hand out the input embeddings of a RemoteModel: its weights live on the "
            "server; pass input_ids, or inputs_embeds you computed locally"
        )

    def __getattr__(self, name: str) -> Any:
        if name in _PLACEMENT:
            return self._placement(name)
        if name in _LOCAL_ONLY:
            raise UsageError(f"cannot call {name}() on a RemoteModel: {_LOCAL_ONLY[name]}")
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def _placement(self, name: str) -> Any:
        def keep(*args: Any, **kwargs: Any) -> RemoteModel:
            log.debug("RemoteModel.%s(): the server decides placement; nothing to do", name)
            return self

        return keep

    training = False  # as nn.Module says it: the server runs the model in eval mode

    def eval(self) -> RemoteModel:
        """A no-op: the server runs the model in eval mode already."""
        return self

    def train(self, mode: bool = True) -> RemoteModel:
        """`train(False)` is `eval()`; training is not something a RemoteModel does."""
        if mode:
            raise UsageError("cannot call train() on a RemoteModel: it runs inference only")
        return self

    # -- the forward pass -------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """One forward pass, taking what the local model's forward takes.

        A causal LM returns transformers' CausalLMOutputWithPast: `logits`
        (RemoteTensor or tensor, as the policy decides), the cache
        (`past_key_values`/`cache`: a RemoteCache or a DynamicCache), `loss`
        when given labels, and `hidden_states`/`attentions` when asked. A plain
        module returns its own outputs, as RemoteTensors where the policy keeps them.
        """
        if not self._lm:
            return self._module_call(args, kwargs)
        self._check_weights()
        return self._forward(self._bind(args, kwargs))

    forward = __call__

    def _bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call's arguments by name, as the local model's forward would bind them."""
        if len(args) <= 1 and "input_ids" not in kwargs and kwargs.keys() <= _NAMED:
            bound = dict(kwargs)  # the common call: no binding needed (inspect costs ~100 us)
            if args:
                bound["input_ids"] = args[0]
        else:
            try:
                bound = self._signature.bind(None, *args, **kwargs).arguments
            except TypeError as exc:
                raise UsageError(f"cannot run the model: {exc}") from None
            bound.pop("self", None)
            bound.update(bound.pop("kwargs", {}) or {})
        unsupported = sorted(
            name for name, value in bound.items() if name not in FORWARD_ARGS and value is not None
        )
        if unsupported:
            raise UsageError(
                f"cannot pass {', '.join(unsupported)} to a RemoteModel: it takes "
                f"{', '.join(FORWARD_ARGS)}"
            )
        if bound.get("cache") is not None and bound.get("past_key_values") is not None:
            raise UsageError("cannot take two caches: pass past_key_values or cache, not both")
        return bound

    def _input(self, value: Any, name: str) -> torch.Tensor | RemoteTensor:
        if isinstance(value, RemoteTensor):
            value._check_session(self._session, name)
            return value.cpu() if value._changed_here() else value
        if isinstance(value, torch.Tensor):
            return value.detach().cpu()
        if isinstance(value, (list, tuple)):
            return torch.tensor(value)
        raise UsageError(f"cannot use {name} of type {type(value).__name__}: pass a tensor")

    def _forward(self, bound: dict[str, Any]) -> Any:
        cache = bound.get("past_key_values") or bound.get("cache")
        if isinstance(cache, RemoteCache):
            cache._check_session(self._session, "a KV cache")
        cached = cache_length(cache)
        inputs = {
            name: self._input(bound[name], name)
            for name in ("input_ids", "inputs_embeds", "attention_mask", "position_ids", "labels")
            if bound.get(name) is not None
        }
        rows, new = self._check_inputs(inputs, cached)
        use_cache = bound.get("use_cache")
        if use_cache is None:
            use_cache = bool(getattr(self.config, "use_cache", True))
        keep = bound.get("logits_to_keep") or 0
        if not isinstance(keep, int):
            raise UsageError("cannot run the model: logits_to_keep must be an int")
        hidden = bool(bound.get("output_hidden_states"))
        attentions = bool(bound.get("output_attentions"))
        item = self.dtype.itemsize
        kept = new if keep == 0 else min(keep, new)
        row_bytes = rows * self._facts.vocab_size * item  # one position of every row
        cache_bytes = rows * (cached + new) * self._facts.kv_bytes_per_token(item)
        phase = detect_phase(cached)
        self._session.phase = phase
        decided = plan(
            Call(
                "forward",
                phase,
                inputs=tuple(_input_value(n, t) for n, t in inputs.items())
                + ((_cache_value(cache),) if cache is not None else ()),
                outputs=(
                    # the positions before the last: nobody reads them in a decode loop
                    Value("logits[:, :-1]", Lifecycle.ACTIVATION, row_bytes * (kept - 1)),
                    Value("logits[:, -1]", Lifecycle.OUTPUT, row_bytes),
                )
                + (
                    (Value("past_key_values", Lifecycle.SESSION_STATE, cache_bytes),)
                    if use_cache
                    else ()
                )
                + ((Value("loss", Lifecycle.OUTPUT, 4, read=True),) if "labels" in inputs else ()),
            ),
            self.policy,
        )
        return self._run_forward(
            bound,
            inputs,
            cache,
            use_cache,
            keep,
            hidden,
            attentions,
            decided,
            (rows, kept, cached + new),
        )

    def _check_inputs(self, inputs: dict[str, Any], cached: int) -> tuple[int, int]:
        """The server's checks, made here too: a bad input fails at the line that passed it,
        even when the call is only queued."""
        facts = self._facts
        ids, embeds = inputs.get("input_ids"), inputs.get("inputs_embeds")
        if (ids is None) == (embeds is None):
            raise UsageError("cannot run the model: pass input_ids or inputs_embeds (one)")
        source = ids if ids is not None else embeds
        assert source is not None
        if ids is not None:  # a RemoteTensor's values are checked on the server
            local = ids if isinstance(ids, torch.Tensor) else _meta(ids)
            facts.check_ids(local)
        elif source.dim() != 3:
            raise UsageError("cannot run the model: inputs_embeds must be [batch, seq, hidden]")
        rows, new = int(source.shape[0]), int(source.shape[1])
        facts.check_length(cached, new)
        value = inputs.get("attention_mask")
        if isinstance(value, torch.Tensor):
            check_mask(value, rows, cached + new)
        value = inputs.get("position_ids")
        if isinstance(value, torch.Tensor):
            check_positions(value, rows, new, facts.max_positions)
        value = inputs.get("labels")
        if isinstance(value, torch.Tensor):
            check_labels(value, (rows, new), facts.vocab_size)
        return rows, new

    def _run_forward(
        self,
        bound: dict[str, Any],
        inputs: dict[str, Any],
        cache: Any,
        use_cache: bool,
        keep: int,
        hidden: bool,
        attentions: bool,
        decided: Plan,
        shape: tuple[int, int, int],
    ) -> Any:
        session = self._session
        rows, kept, length = shape
        logits_ref = session.new_ref()
        cache_ref = cache.ref if isinstance(cache, RemoteCache) else session.new_ref()
        loss_ref = session.new_ref() if "labels" in inputs else None
        op = messages.ForwardOp(
            **{n: (t.ref if isinstance(t, RemoteTensor) else t) for n, t in inputs.items()},
            cache=_cache_wire(cache),
            use_cache=use_cache,
            logits_to_keep=keep,
            out_logits=logits_ref.id,
            out_cache=cache_ref.id if use_cache else 0,
            out_loss=loss_ref.id if loss_ref is not None else 0,
            output_hidden_states=hidden,
            output_attentions=attentions,
        )
        index = session.enqueue(op, "forward", room=2)  # the forward and its tail go together
        session.record(decided)
        fetch: list[messages.Fetch] = []
        logits: RemoteTensor | None = None
        tail: Ref | None = None
        if decided.data("logits[:, -1]") and (kept == 1 or decided.data("logits[:, :-1]")):
            fetch.append(messages.Fetch(logits_ref.id))
        else:
            vocab = self._facts.vocab_size
            logits = RemoteTensor(session, logits_ref, (rows, kept, vocab), self.dtype, "logits")
            if decided.data("logits[:, -1]"):  # the last row alone, fetched with this call
                tail = session.new_ref()
                last = wire_value((logits_ref, (slice(None), slice(-1, None))))
                session.enqueue(
                    messages.TensorOp("Tensor.__getitem__", last, {}, [tail.id]), "forward"
                )
                fetch.append(messages.Fetch(tail.id))
        cache_data = use_cache and decided.data("past_key_values")
        if cache_data:
            fetch.append(messages.Fetch(cache_ref.id, "cache"))
        if loss_ref is not None:
            fetch.append(messages.Fetch(loss_ref.id))
        ran = session.run(fetch) if fetch or hidden or attentions else None
        values = ran.values if ran is not None else {}
        out: dict[str, Any] = {}
        if loss_ref is not None:
            out["loss"] = values[loss_ref.id]
            session.release(loss_ref)
        if logits is None:
            out["logits"] = values[logits_ref.id]
            session.release(logits_ref)
        else:
            if tail is not None:
                logits._arrived_tail(values[tail.id])
                session.release(tail)
            out["logits"] = logits
        if use_cache:
            out[_cache_field()] = self._cache_out(cache, cache_ref, values, cache_data, length)
        if ran is not None and index in ran.described:
            out.update(self._states(ran.described[index]))
        session.flush()
        from transformers.modeling_outputs import CausalLMOutputWithPast

        result = CausalLMOutputWithPast(**out)
        return result if bound.get("return_dict", True) is not False else result.to_tuple()

    def _cache_out(
        self, cache: Any, ref: Ref, values: dict[int, Any], data: bool, length: int
    ) -> Any:
        if data:
            self._session.release(ref)
            return cache_from_layers(values[ref.id], self.config)
        if isinstance(cache, RemoteCache):
            cache._update(length)
            return cache
        return RemoteCache(self._session, ref, length)

    def _states(self, described: messages.Described) -> dict[str, Any]:
        """Hidden states and attentions: RemoteTensors, or data where the policy says."""
        states = remote_tree(self._session, described, "states")
        outputs = tuple(Value(n, Lifecycle.OUTPUT, 0) for n in ("hidden_states", "attentions"))
        decided = plan(Call("forward", self._session.phase, outputs=outputs), self.policy)
        self._session.record(decided)
        if decided.data("hidden_states"):
            states = map_tree(states, lambda v: v.cpu() if isinstance(v, RemoteTensor) else v)
        return {k: v for k, v in states.items() if v is not None}

    def _module_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        session = self._session

        def to_wire(value: Any) -> Any:
            if isinstance(value, RemoteTensor):
                value._check_session(session, "an argument")
                return value.wired()
            return value

        wire_args, wire_kwargs = map_tree((args, kwargs), to_wire)
        index = session.enqueue(
            messages.CallOp(wire_value(wire_args), wire_value(wire_kwargs)), "call"
        )
        described = session.run().described[index]
        result = remote_tree(session, described, "output")
        outputs = tuple(Value("output", Lifecycle.OUTPUT, 0) for _ in described.metas)
        decided = plan(Call("call", session.phase, outputs=outputs), self.policy)
        session.record(decided)
        if outputs and decided.data("output"):
            result = map_tree(result, lambda v: v.cpu() if isinstance(v, RemoteTensor) else v)
        session.flush()
        return result

    # -- generation -------------------------------------------------------------------

    def generate(self, inputs: Any = None, **kwargs: Any) -> Any:
        """transformers' generate, run on the server: takes what `model.generate` takes and
        returns what it returns. Greedy and beam search give the local model's tokens;
        sampling draws its seed from the caller's torch RNG (so `torch.manual_seed`
        repeats a sample), or from `seed=`. Streamers get tokens as they are made.
        `timeout=` (seconds) bounds the call; running past it, or Ctrl-C, cancels the
        generate on the server."""
        if not self._lm:
            raise UsageError("cannot generate: this RemoteModel wraps a plain nn.Module")
        self._check_weights()
        return GenerateCall(self, inputs, kwargs).run()

    def stream(self, inputs: Any = None, **kwargs: Any) -> Generator[torch.Tensor, None, None]:
        """Yields each step's new tokens, [batch, 1], as `generate` makes them; leaving the
        loop early cancels the generate on the server."""
        if not self._lm:
            raise UsageError("cannot generate: this RemoteModel wraps a plain nn.Module")
        self._check_weights()
        return GenerateCall(self, inputs, kwargs).stream()

    # -- bookkeeping ------------------------------------------------------------------

    def synchronize(self) -> None:
        """Run queued work now (as torch.cuda.synchronize does for a GPU): its errors
        surface here, and server memory reflects it."""
        self._session.run()

    @property
    def decisions(self) -> list[DecisionRecord]:
        """The recent decisions, oldest first: op, value, lifecycle, decision, bytes,
        phase and the reason."""
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
            "by_phase": self._session.decisions.by_phase(),
        }

    @property
    def client(self) -> Client:
        return self._client

    @property
    def session(self) -> RemoteSession:
        return self._session

    def close(self) -> None:
        """Free this model's server-side state (and the connection, if it opened one)."""
        self._session.close()
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> RemoteModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"RemoteModel({self.fingerprint[:12]}, server={self._client.address}, "
            f"policy={self.policy.name})"
        )


def _fingerprinted(folder: Folder) -> Folder:
    """The folder with its fingerprint, remembered or read from its files."""
    began = time.perf_counter()
    folder = fingerprinted(folder, user_cache())
    seconds = time.perf_counter() - began
    log.info(
        "model %s: fingerprint %s (%.1f s)", folder.path, folder.spec.fingerprint[:12], seconds
    )
    return folder


def _generation(fields: dict[str, Any] | None) -> Any:
    """A GenerationConfig from the fields a spec or card carries."""
    if fields is None:
        return None
    from transformers import GenerationConfig

    return GenerationConfig.from_dict(fields)


def _meta(remote: RemoteTensor) -> torch.Tensor:
    """A RemoteTensor's shape and dtype, to check with the checks for local tensors."""
    return torch.empty(remote.shape, dtype=remote.dtype, device="meta")


def _input_value(name: str, tensor: torch.Tensor | RemoteTensor) -> Value:
    if isinstance(tensor, RemoteTensor):
        return Value(name, Lifecycle.ACTIVATION, 0, Side.SERVER)
    return Value(name, Lifecycle.ACTIVATION, tensor.nbytes, Side.CLIENT)


def _cache_value(cache: Any) -> Value:
    if isinstance(cache, RemoteCache):
        return Value("past_key_values", Lifecycle.SESSION_STATE, 0, Side.SERVER)
    nbytes = sum(k.nbytes + v.nbytes for k, v in cache_layers(cache))
    return Value("past_key_values", Lifecycle.SESSION_STATE, nbytes, Side.CLIENT)


def _cache_wire(cache: Any) -> Any:
    if cache is None:
        return None
    if isinstance(cache, RemoteCache):
        return cache.ref
    return wire_value([(k.detach().cpu(), v.detach().cpu()) for k, v in cache_layers(cache)])


@functools.cache
def _cache_field() -> str:
    """What this transformers version's outputs call the cache."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    fields = CausalLMOutputWithPast.__dataclass_fields__
    return "cache" if "cache" in fields else "past_key_values"
