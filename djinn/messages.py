"""Every message djinn sends, declared once, typed, and validated as it is decoded.

A message is a msgspec Struct encoded as a MessagePack array whose first
element is its tag, so nothing is parsed by position by hand and a field of
the wrong type fails at decode with a message that names it. Fields typed
`Any` hold dynamic values (tensors, references, op arguments); they are
checked for depth and size at decode (`codec.check_value`). A newer or
older peer is caught by the frame header's protocol version first; an
unknown tag or extra field reaches the caller as a protocol error that
says so.

    client -> server  REQUEST  one of `Request`
    server -> client  RESPONSE the reply named beside each request
                      ERROR    `Failure`
                      STREAM   `Streamed` (tokens of a running generate)
    client -> server  CANCEL   (no body): stop the request with that id
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import msgspec

from djinn.net.codec import OutgoingTuple, check_value

# Session ids, fingerprints, names: short strings.
_Id = Annotated[str, msgspec.Meta(max_length=128)]
_Name = Annotated[str, msgspec.Meta(max_length=256)]
FINGERPRINT_CHARS: Final = frozenset("0123456789abcdef")


class Message(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    """Base of every message: compact on the wire (an array), its fields checked."""


def _checked(*values: tuple[Any, str]) -> None:
    for value, what in values:
        if type(value) in _CONTAINERS:
            check_value(value, what)


_CONTAINERS: Final = frozenset({list, tuple, dict})


def is_fingerprint(value: object) -> bool:
    """64 lowercase hex digits: the only form a model id takes on its way to the store."""
    return isinstance(value, str) and len(value) == 64 and set(value) <= FINGERPRINT_CHARS


# -- parts ----------------------------------------------------------------------------------


class TensorMeta(Message):
    shape: list[int]
    dtype: str


class TensorEntry(Message):
    """One weight of a model: name, dtype, shape."""

    name: _Name
    dtype: Annotated[str, msgspec.Meta(max_length=32)]
    shape: Annotated[list[int], msgspec.Meta(max_length=64)]


class ModelSpec(Message):
    """How to build a model, and which weights it takes.

    kind "transformers": `cls` is a transformers class, `config` its config
    dict; "pickle": `code` is the cloudpickled module (weights left out).
    """

    kind: Literal["transformers", "pickle"]
    cls: _Name
    fingerprint: _Id
    manifest: list[TensorEntry]
    aliases: list[tuple[_Name, _Name]] = []
    config: dict[str, Any] | None = None
    generation_config: dict[str, Any] | None = None
    code: bytes | None = None

    def __post_init__(self) -> None:
        if not is_fingerprint(self.fingerprint):
            raise ValueError("the fingerprint must be 64 lowercase hex digits")
        _checked((self.config, "config"), (self.generation_config, "generation config"))


class ModelInfo(Message):
    """A model a server holds, as `Client.models()` lists it."""

    name: str
    fingerprint: str
    parameters: int
    dtype: str
    resident: bool
    nbytes: int


class Fetch(Message):
    """Bring a value to the client: a tensor, or a KV cache as (keys, values) per layer."""

    ref: int
    form: Literal["tensor", "cache"] = "tensor"


class Described(Message):
    """Outputs whose structure the client could not infer: the structure with Refs
    in place of tensors, and each Ref's shape and dtype."""

    structure: Any
    metas: dict[int, TensorMeta]

    def __post_init__(self) -> None:
        _checked((self.structure, "structure"))


# -- queued operations --------------------------------------------------------------------


class TensorOp(Message, tag="op"):
    """`name(*args, **kwargs)` from djinn.ops; results stay under the `out` ids.
    `describe`: the client could not infer the results, the server says what they are.
    `seed`: for a random operation, the seed of the generator it draws from."""

    name: Annotated[str, msgspec.Meta(max_length=64)]
    args: Any
    kwargs: dict[str, Any]
    out: list[int]
    describe: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.args, (tuple, OutgoingTuple)):
            raise ValueError("op arguments must be a tuple")
        _checked((self.args, "op arguments"), (self.kwargs, "op keyword arguments"))


class ForwardOp(Message, tag="forward"):
    """One call of the session's model. Inputs are Refs or tensors; `cache` is a
    Ref, a list of (keys, values), or None. Outputs stay under the `out_*` ids
    (0: not wanted); hidden states and attentions, when asked for, under ids the
    server gives them (described)."""

    input_ids: Any = None
    attention_mask: Any = None
    position_ids: Any = None
    inputs_embeds: Any = None
    labels: Any = None
    cache: Any = None
    use_cache: bool = True
    logits_to_keep: int = 0
    out_logits: int = 0
    out_cache: int = 0
    out_loss: int = 0
    output_hidden_states: bool = False
    output_attentions: bool = False

    def __post_init__(self) -> None:
        _checked(
            (self.input_ids, "input_ids"),
            (self.attention_mask, "attention_mask"),
            (self.position_ids, "position_ids"),
            (self.inputs_embeds, "inputs_embeds"),
            (self.labels, "labels"),
            (self.cache, "cache"),
        )


class CallOp(Message, tag="call"):
    """A call of a plain nn.Module; its outputs come back described."""

    args: Any
    kwargs: dict[str, Any]

    def __post_init__(self) -> None:
        if not isinstance(self.args, (tuple, OutgoingTuple)):
            raise ValueError("call arguments must be a tuple")
        _checked((self.args, "call arguments"), (self.kwargs, "call keyword arguments"))


Op = TensorOp | ForwardOp | CallOp


class Prelude(Message):
    """What a session call carries before its own work: references the client
    dropped (freed after the call), operations it queued (run first, in order),
    and values to bring back."""

    released: list[int] = []
    ops: list[Op] = []
    fetch: list[Fetch] = []


class Component(Message):
    """A transformers LogitsProcessor or StoppingCriteria, as its class name and arguments."""

    name: Annotated[str, msgspec.Meta(max_length=64)]
    kwargs: dict[str, Any]

    def __post_init__(self) -> None:
        _checked((self.kwargs, f"{self.name} arguments"))


class GenerateArgs(Message):
    """transformers' generate, as the client called it.

    `config`: GenerationConfig fields on top of the model's own; `seed`: the
    sampling seed, drawn from the caller's torch RNG; `cache`: a held cache to
    continue (0: none); `keep`: the GenerateOutput's fields beyond the sequences
    stay on the server (under ids it gives them) rather than come back as data.
    """

    input_ids: Any
    attention_mask: Any = None
    config: dict[str, Any] = {}
    processors: list[Component] = []
    criteria: list[Component] = []
    seed: int | None = None
    stream: bool = False
    cache: int = 0
    keep: bool = False

    def __post_init__(self) -> None:
        _checked(
            (self.input_ids, "input_ids"),
            (self.attention_mask, "attention_mask"),
            (self.config, "generation config"),
        )


# -- requests -------------------------------------------------------------------------------


class Ping(Message, tag="ping"):
    pass


class Echo(Message, tag="echo"):
    value: Any

    def __post_init__(self) -> None:
        _checked((self.value, "echo value"))


class Stats(Message, tag="stats"):
    pass


class Models(Message, tag="models"):
    pass


class Register(Message, tag="register"):
    spec: ModelSpec


class Upload(Message, tag="upload"):
    """Weights `start`, `start + 1`, ... of a registered model's manifest."""

    fingerprint: _Id
    start: int
    tensors: list[Any]


class Commit(Message, tag="commit"):
    fingerprint: _Id


class OpenSession(Message, tag="open"):
    """A session on a model: a fingerprint, a name the server holds, or None (no model).
    `describe` asks for the model's card: a client that attached by name has no config."""

    model: _Name | None = None
    describe: bool = False


class CloseSession(Message, tag="close"):
    session: _Id


class Run(Message, tag="run"):
    """Run a session's queued operations and bring values back."""

    session: _Id
    prelude: Prelude


class Generate(Message, tag="generate"):
    session: _Id
    prelude: Prelude
    args: GenerateArgs


Request = (
    Ping | Echo | Stats | Models | Register | Upload | Commit | OpenSession | CloseSession | Run
) | Generate


# -- replies --------------------------------------------------------------------------------


class Done(Message, tag="done"):
    pass


class Echoed(Message, tag="echoed"):
    value: Any


class StatsReply(Message, tag="stats"):
    stats: dict[str, Any]


class ModelsReply(Message, tag="models"):
    models: list[ModelInfo]


class Registered(Message, tag="registered"):
    """`ready`: the server holds the model. `upload`: send the weights from index
    `have` on (earlier ones survived an interrupted upload), `chunk_bytes` at a time."""

    status: Literal["ready", "upload"]
    fingerprint: str
    have: int = 0
    chunk_bytes: int = 0


class ModelCard(Message):
    """A transformers model as a client stands in for it: class, config, generation defaults."""

    cls: str
    config: dict[str, Any]
    generation_config: dict[str, Any] | None = None


class SessionOpened(Message, tag="opened"):
    session: str
    fingerprint: str | None = None
    card: ModelCard | None = None


class Ran(Message, tag="ran"):
    """Fetched values by reference id, and what the server described, by op index."""

    values: dict[int, Any] = {}
    described: dict[int, Described] = {}


class Generated(Message, tag="generated"):
    """The new tokens, and the GenerateOutput's other fields the caller asked for."""

    values: dict[int, Any]
    tokens: Any
    outputs: Described | None = None


Reply = Done | Echoed | StatsReply | ModelsReply | Registered | SessionOpened | Ran | Generated


class Failure(Message, tag="failure"):
    """An ERROR frame: the error's code (see djinn.errors), message, the server-side
    type name, and for a failed queued operation its index in the batch."""

    code: str
    message: str
    remote_type: str = ""
    op: int | None = None


class Streamed(Message, tag="streamed"):
    """Tokens a running generate made, [batch] or [batch, n]."""

    tokens: Any


class ServerInfo(Message):
    """What the server tells a client in the handshake."""

    version: str
    protocol: int
    device: str
    dtype: str
    trust_remote_code: bool
