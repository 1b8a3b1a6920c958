"""`RemoteModel.generate` and `.stream`: a caller's generate arguments, sent and answered.

The arguments are those of transformers' `generate`; they are merged as
transformers merges them (the model's generation_config, then a passed
GenerationConfig, then keyword arguments) and validated here with
transformers' own checks, so a bad value raises what it raises locally.
Client-side objects stay here: a streamer gets the tokens the server
streams; processors and criteria travel as data (djinn.generation).
"""

from __future__ import annotations

import copy
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, Final

import msgspec
import torch

from djinn import messages
from djinn.errors import ServerError, UsageError
from djinn.generation import check_token_ids, component, config_fields, plain
from djinn.kvcache import cache_from_layers
from djinn.semantics import Call, Lifecycle, Phase, Side, Value, plan
from djinn.tensor import RemoteCache, RemoteTensor, remote_tree

if TYPE_CHECKING:
    from djinn.model import RemoteModel

# generate's arguments that take client-side code or a second model.
_REFUSED: Final = {
    "prefix_allowed_tokens_fn": "a callable cannot run on the server; use bad_words_ids or "
    "a built-in LogitsProcessor",
    "assistant_model": "assisted generation needs a second model on the server",
    "negative_prompt_ids": "classifier-free guidance is not supported",
    "negative_prompt_attention_mask": "classifier-free guidance is not supported",
    "custom_generate": "code from a hub does not run on the server",
    "synced_gpus": "the server runs on one device",
    "tokenizer": "stop_strings need the tokenizer on the server; stop from rm.stream(...)",
    "assistant_tokenizer": "assisted generation needs a second model on the server",
}


class GenerateCall:
    """One call of generate or stream, parsed."""

    def __init__(self, model: RemoteModel, inputs: Any, kwargs: dict[str, Any]) -> None:
        self._model = model
        self._session = model.session
        kwargs = dict(kwargs)
        for name, why in _REFUSED.items():
            if kwargs.pop(name, None) not in (None, False):
                raise UsageError(f"cannot generate with {name}: {why}")
        ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        if ids is None:
            raise UsageError("cannot generate: pass input_ids (the prompt)")
        self.ids = model._input(ids, "input_ids")
        mask = kwargs.pop("attention_mask", None)
        self.mask = model._input(mask, "attention_mask") if mask is not None else None
        self.streamer = kwargs.pop("streamer", None)
        if self.streamer is not None and not callable(getattr(self.streamer, "put", None)):
            raise UsageError("cannot generate: a streamer needs put(tokens) and end()")
        self.cache = self._cache(kwargs.pop("past_key_values", None) or kwargs.pop("cache", None))
        processors = [
            component(p, "logits_processor") for p in kwargs.pop("logits_processor", None) or []
        ]
        criteria = [
            component(c, "stopping_criteria") for c in kwargs.pop("stopping_criteria", None) or []
        ]
        seed = kwargs.pop("seed", None)
        self.timeout: float | None = kwargs.pop("timeout", None)
        self.config = self._merged(kwargs.pop("generation_config", None), kwargs)
        fields = self._fields(kwargs)
        vocab = model._facts.vocab_size
        check_token_ids(self.config.to_dict(), vocab)
        for spec in (*processors, *criteria):
            check_token_ids(spec.kwargs, vocab, f"use {spec.name}", strict=True)
        if self.config.do_sample and seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())  # the caller's RNG, as local sampling
        self.return_dict = bool(self.config.return_dict_in_generate)
        decided = self._plan()
        self.args = messages.GenerateArgs(
            input_ids=_wire(self.ids),
            attention_mask=_wire(self.mask) if self.mask is not None else None,
            config=fields,
            processors=processors,
            criteria=criteria,
            seed=seed,
            stream=self.streamer is not None,
            cache=self.cache.ref.id if self.cache is not None else 0,
            keep=self.return_dict and not decided.data("outputs"),
        )

    def _cache(self, cache: Any) -> RemoteCache | None:
        if cache is None:
            return None
        if not isinstance(cache, RemoteCache):
            raise UsageError(
                "cannot generate from a local cache: pass the RemoteCache a previous call returned "
                "(policy='full'), or the whole sequence as input_ids"
            )
        cache._check_session(self._session, "a KV cache")
        return cache

    def _merged(self, passed: Any, kwargs: dict[str, Any]) -> Any:
        """The effective GenerationConfig, as transformers would build it, checked with its
        own validation (a bad value raises here what it raises locally)."""
        from transformers import GenerationConfig

        base = self._model.generation_config
        config = copy.deepcopy(base) if base is not None else GenerationConfig()  # type: ignore[no-untyped-call]
        if passed is not None:
            if not isinstance(passed, GenerationConfig):
                raise UsageError("cannot generate: generation_config must be a GenerationConfig")
            config.update(**passed.to_diff_dict())
        unknown = config.update(**{k: v for k, v in kwargs.items() if k != "transformers_version"})
        if unknown:
            config_fields(unknown, "the arguments")  # raises, naming what the server takes
        config.validate()
        return config

    def _fields(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """What to send: the effective config's difference from the one the server holds."""
        registered = self._model._registered_generation
        known = registered.to_dict() if registered is not None else {}
        wanted = self.config.to_dict()
        fields = {  # compared as plain values: an eos_token_id may come as a tensor
            k: v
            for k, v in wanted.items()
            if k not in ("transformers_version", "_from_model_config")
            and plain(known.get(k)) != plain(v)
        }
        return config_fields(fields, "the generation settings")

    def _plan(self) -> Any:
        ids = self.ids
        inputs = (
            Value(
                "input_ids",
                Lifecycle.ACTIVATION,
                0 if isinstance(ids, RemoteTensor) else ids.nbytes,
                Side.SERVER if isinstance(ids, RemoteTensor) else Side.CLIENT,
            ),
        )
        outputs = (
            Value("tokens", Lifecycle.OUTPUT, 0, read=True),
            Value("logits", Lifecycle.ACTIVATION, 0),
            Value("past_key_values", Lifecycle.SESSION_STATE, 0),
            Value("outputs", Lifecycle.OUTPUT, 0),
        )
        decided = plan(
            Call("generate", Phase.PREFILL, inputs, outputs if self.return_dict else outputs[:2]),
            self._model.policy,
        )
        self._session.record(decided)
        return decided if self.return_dict else _NoOutputs(decided)

    # -- running ------------------------------------------------------------------------

    def run(self) -> Any:
        if self.streamer is not None:
            self.streamer.put(_prompt(self.ids))
        reply = self._session.generate(self.args, self._on_tokens, self.timeout)
        if self.streamer is not None:
            self.streamer.end()
        return self._result(reply)

    def _on_tokens(self, streamed: messages.Streamed) -> None:
        if self.streamer is not None:
            self.streamer.put(streamed.tokens)

    def stream(self) -> Generator[torch.Tensor, None, None]:
        args = msgspec.structs.replace(self.args, stream=True)
        session, client = self._session, self._model.client
        request_id, queue, ended = session.send_generate(args)
        finished, how = False, "stopped"
        try:
            while True:
                wait = self.timeout if self.timeout is not None else client.timeout
                event = client.connection.next_partial(request_id, timeout=wait)
                if isinstance(event, messages.Streamed):
                    tokens = event.tokens
                    yield tokens[:, None] if tokens.dim() == 1 else tokens
                    continue
                finished, how = True, "completed"
                assert isinstance(event, messages.Generated)
                session.deliver(event.values)
                self._result(event)  # a continued cache's new length
                return
        except ServerError as exc:
            finished, how = True, "refused"
            located = session.located(exc, queue)
            if located is exc:
                raise
            raise located from exc
        finally:
            if not finished:  # left early, timed out or interrupted: stop the server's work
                client.connection.cancel(request_id)
            ended(how)

    def _result(self, reply: messages.Generated) -> Any:
        ids = _prompt(self.ids)
        tokens = reply.tokens.to(ids.dtype)
        repeats = max(1, tokens.shape[0] // max(1, ids.shape[0]))
        sequences = torch.cat([ids.repeat_interleave(repeats, 0), tokens], dim=-1)
        if self.cache is not None:
            self.cache._update(sequences.shape[1] - 1)
        if not self.return_dict:
            return sequences
        return self._output(sequences, reply.outputs)

    def _output(self, sequences: torch.Tensor, described: messages.Described | None) -> Any:
        from transformers.generation.utils import (
            GenerateBeamDecoderOnlyOutput,
            GenerateDecoderOnlyOutput,
        )

        fields: dict[str, Any] = {}
        if described is not None:
            fields = remote_tree(self._session, described, "generate")
        for name in ("past_key_values", "cache"):
            value = fields.get(name)
            if isinstance(value, list):  # sent as layers
                fields[name] = cache_from_layers(value, self._model.config)
        beam = "beam_indices" in fields or "sequences_scores" in fields
        cls = GenerateBeamDecoderOnlyOutput if beam else GenerateDecoderOnlyOutput
        known = cls.__dataclass_fields__
        chosen = {k: v for k, v in fields.items() if k in known}
        return cls(sequences=sequences, **chosen)  # type: ignore[arg-type]


class _NoOutputs:
    """The plan of a generate that returns only its tokens."""

    def __init__(self, decided: Any) -> None:
        self._decided = decided

    def data(self, name: str) -> bool:
        return name != "outputs" and bool(self._decided.data(name))


def _wire(value: torch.Tensor | RemoteTensor) -> Any:
    return value.wired() if isinstance(value, RemoteTensor) else value


def _prompt(ids: torch.Tensor | RemoteTensor) -> torch.Tensor:
    return ids.cpu() if isinstance(ids, RemoteTensor) else ids
