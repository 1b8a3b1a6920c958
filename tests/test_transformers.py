"""A drop-in for transformers: the same calls on a RemoteModel and on the local model
give the same results, option by option, for five model families.

Each row of the matrix runs one generate (or forward) option on the local
transformers model and on a RemoteModel of it (policy full) and compares
them exactly: token ids, and scores or losses to float tolerance.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    MaxLengthCriteria,
    PreTrainedTokenizerFast,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteriaList,
    pipeline,
)

import djinn
from djinn import RemoteModel, RemoteTensor
from djinn.errors import DjinnTimeoutError, RemoteUsageError, UsageError
from djinn.tensor import RemoteCache
from harness.server import ServerProcess
from tests.models import FAMILIES, VOCAB, prompt

pytestmark = pytest.mark.timeout(180)


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny models' vocabulary, built here: nothing from a hub."""
    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3}
    vocab.update({f"w{i}": i for i in range(4, VOCAB)})
    inner = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    inner.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=inner,
        pad_token="[PAD]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        unk_token="[UNK]",
    )
    tok.chat_template = (
        "{% for m in messages %}w10 {{ m['content'] }} w11 {% endfor %}"
        "{% if add_generation_prompt %}w12{% endif %}"
    )
    return tok


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(
    request: pytest.FixtureRequest, server: ServerProcess
) -> Iterator[tuple[torch.nn.Module, RemoteModel]]:
    local = FAMILIES[request.param]()
    with RemoteModel(FAMILIES[request.param](), server.address) as remote:
        yield local, remote


def left_padded() -> tuple[torch.Tensor, torch.Tensor]:
    ids = prompt(batch=2, length=10)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0  # row 1 is 4 tokens shorter, padded on the left
    return ids, mask


def _greedy_tokens(local: Any, ids: torch.Tensor) -> list[int]:
    with torch.no_grad():
        out = local.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1] :].tolist()  # type: ignore[no-any-return]


# Each case: the generate keyword arguments, applied to both models.
CASES: dict[str, Callable[[Any], dict[str, Any]]] = {
    "greedy": lambda local: {"max_new_tokens": 12, "do_sample": False},
    "beam": lambda local: {"max_new_tokens": 8, "num_beams": 3, "num_return_sequences": 2},
    "left-padded-batch": lambda local: {
        "input_ids": left_padded()[0],
        "attention_mask": left_padded()[1],
        "max_new_tokens": 10,
        "pad_token_id": 0,
    },
    "repetition-penalties": lambda local: {
        "max_new_tokens": 12,
        "repetition_penalty": 1.5,
        "no_repeat_ngram_size": 2,
    },
    "min-max-length": lambda local: {"min_new_tokens": 5, "max_length": 20, "eos_token_id": 2},
    "eos-list": lambda local: {
        "max_new_tokens": 12,
        "eos_token_id": _greedy_tokens(local, prompt())[3:5],  # tokens it does make: it stops
        "pad_token_id": 0,
    },
    "eos-tensor": lambda local: {
        "max_new_tokens": 12,
        "eos_token_id": torch.tensor(_greedy_tokens(local, prompt())[3:5]),
        "pad_token_id": 0,
    },
    "generation-config": lambda local: {
        "generation_config": GenerationConfig(max_new_tokens=9, repetition_penalty=1.2)
    },
    "processors-and-criteria": lambda local: {
        "logits_processor": LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.4)]),
        "stopping_criteria": StoppingCriteriaList([MaxLengthCriteria(18)]),
        "max_new_tokens": 20,
    },
    "bad-words-and-forced-bos": lambda local: {
        "max_new_tokens": 8,
        "bad_words_ids": [[t] for t in _greedy_tokens(local, prompt())[:2]],
        "forced_bos_token_id": 7,
    },
    "max-new-tokens-zero": lambda local: {"max_new_tokens": 0},
    "top-k-off": lambda local: {"max_new_tokens": 5, "top_k": 0},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_generate_matches_local(pair: tuple[Any, RemoteModel], case: str) -> None:
    local, remote = pair
    kwargs = CASES[case](local)
    kwargs.setdefault("input_ids", prompt())
    try:
        with torch.no_grad():
            expected = local.generate(**kwargs)
    except ValueError as exc:  # what local refuses, remote refuses with the same words
        with pytest.raises(ValueError, match=str(exc)[:30].replace("`", ".")):
            remote.generate(**kwargs)
        return
    assert torch.equal(remote.generate(**kwargs), expected)


def test_return_dict_with_scores_logits_and_cache(pair: tuple[Any, RemoteModel]) -> None:
    local, remote = pair
    kwargs = {
        "max_new_tokens": 6,
        "return_dict_in_generate": True,
        "output_scores": True,
        "output_logits": True,
    }
    with torch.no_grad():
        expected = local.generate(prompt(), **kwargs)
    got = remote.generate(prompt(), **kwargs)
    assert type(got) is type(expected)
    assert torch.equal(got.sequences, expected.sequences)
    assert len(got.scores) == len(expected.scores) == 6
    assert isinstance(got.scores[0], RemoteTensor)  # kept on the server until read
    for mine, theirs in zip(got.logits, expected.logits, strict=True):
        torch.testing.assert_close(mine.cpu(), theirs)
    torch.testing.assert_close(got.scores[-1].cpu(), expected.scores[-1])
    cache = got.past_key_values
    assert isinstance(cache, RemoteCache) and cache.get_seq_length() == 12 + 6 - 1


def test_sampling_repeats_with_the_callers_seed(pair: tuple[Any, RemoteModel]) -> None:
    _, remote = pair
    kwargs = {"max_new_tokens": 12, "do_sample": True, "top_k": 50, "temperature": 1.5}
    torch.manual_seed(7)
    first = remote.generate(prompt(), **kwargs)
    torch.manual_seed(7)
    again = remote.generate(prompt(), **kwargs)
    torch.manual_seed(8)
    other = remote.generate(prompt(), **kwargs)
    assert torch.equal(first, again) and not torch.equal(first, other)


class Collect:
    """A streamer: transformers calls put(prompt), put(tokens) per step, then end()."""

    def __init__(self) -> None:
        self.puts: list[list[int]] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.flatten().tolist())

    def end(self) -> None:
        self.ended = True


def test_streamers_get_what_they_get_locally(pair: tuple[Any, RemoteModel]) -> None:
    local, remote = pair
    mine, theirs = Collect(), Collect()
    with torch.no_grad():
        local.generate(prompt(), max_new_tokens=8, streamer=theirs)
    remote.generate(prompt(), max_new_tokens=8, streamer=mine)
    assert mine.puts == theirs.puts and mine.ended and theirs.ended


def test_stream_yields_generates_tokens_in_order(pair: tuple[Any, RemoteModel]) -> None:
    _, remote = pair
    whole = remote.generate(prompt(batch=2), max_new_tokens=10)
    pieces = list(remote.stream(prompt(batch=2), max_new_tokens=10))
    assert torch.equal(torch.cat(pieces, dim=-1), whole[:, 12:])


def test_forward_takes_the_local_arguments_and_returns_its_output_type(
    pair: tuple[Any, RemoteModel],
) -> None:
    local, remote = pair
    ids, mask = left_padded()
    with torch.no_grad():
        expected = local(ids, attention_mask=mask, labels=ids, output_hidden_states=True)
    out = remote(ids, attention_mask=mask, labels=ids, output_hidden_states=True)
    assert type(out).__name__.startswith("CausalLMOutput")
    torch.testing.assert_close(out.loss, expected.loss)  # the loss comes back as data
    torch.testing.assert_close(out["logits"].cpu(), expected.logits)
    assert out[0] is out.loss and out[1] is out.logits
    assert len(out.hidden_states) == len(expected.hidden_states)
    assert isinstance(out.hidden_states[-1], RemoteTensor)  # until read
    torch.testing.assert_close(out.hidden_states[-1].cpu(), expected.hidden_states[-1])
    with torch.no_grad():
        kept = local(ids, logits_to_keep=1).logits
    torch.testing.assert_close(remote(ids, logits_to_keep=1).logits.cpu(), kept)
    positions = torch.arange(10).expand(2, 10)
    with torch.no_grad():
        moved = local(ids, position_ids=positions).logits
    torch.testing.assert_close(remote(ids, position_ids=positions).logits.cpu(), moved)
    embeds = local.get_input_embeddings()(ids).detach()
    with torch.no_grad():
        from_embeds = local(inputs_embeds=embeds).logits
    torch.testing.assert_close(remote(inputs_embeds=embeds).logits.cpu(), from_embeds)


def test_model_attributes_the_ecosystem_reads(pair: tuple[Any, RemoteModel]) -> None:
    local, remote = pair
    assert remote.config.to_dict() == local.config.to_dict()
    assert remote.generation_config.to_dict() == local.generation_config.to_dict()
    assert remote.device == torch.device("cpu") and remote.server_device.type == "cpu"
    assert remote.dtype == torch.float32 and remote.can_generate()
    assert remote.main_input_name == "input_ids"
    assert remote.to("cuda") is remote and remote.cuda() is remote and remote.half() is remote
    assert remote.eval() is remote and remote.train(False) is remote and not remote.training
    with pytest.raises(UsageError, match="inputs_embeds"):
        remote.get_input_embeddings()
    logits = remote(prompt()).logits
    assert logits.device == remote.server_device
    half = logits.to(torch.float16)
    assert isinstance(half, RemoteTensor) and half.dtype == torch.float16
    with torch.no_grad():
        local_logits = local(prompt()).logits
    assert torch.allclose(logits, local_logits, atol=1e-5)
    loss = torch.nn.functional.cross_entropy(logits[0], prompt()[0])
    torch.testing.assert_close(
        loss.cpu(), torch.nn.functional.cross_entropy(local_logits[0], prompt()[0])
    )
    picked = logits.log_softmax(-1).gather(-1, prompt()[:, :, None])
    torch.testing.assert_close(
        picked.cpu(), local_logits.log_softmax(-1).gather(-1, prompt()[:, :, None])
    )


def test_pipeline_plain_batched_and_chat(pair: tuple[Any, RemoteModel]) -> None:
    local, remote = pair
    tok = tokenizer()
    texts = ["w5 w6 w7 w8", "w9 w10"]
    mine = pipeline("text-generation", model=remote, tokenizer=tok)
    theirs = pipeline("text-generation", model=local, tokenizer=tok)
    options = {"max_new_tokens": 6, "do_sample": False}
    assert mine(texts[0], **options) == theirs(texts[0], **options)
    tok.padding_side = "left"
    assert mine(texts, batch_size=2, **options) == theirs(texts, batch_size=2, **options)
    chat = [{"role": "user", "content": "w20 w21"}]
    assert mine(chat, **options) == theirs(chat, **options)


def test_unknown_arguments_name_what_is_supported(pair: tuple[Any, RemoteModel]) -> None:
    _, remote = pair
    with pytest.raises(UsageError, match="max_new_tokens"):
        remote.generate(prompt(), max_new_tokens=2, stop_strings=["w5"])
    with pytest.raises(UsageError, match="a callable cannot run on the server"):
        remote.generate(prompt(), prefix_allowed_tokens_fn=lambda b, i: [5])
    with pytest.raises(UsageError, match="input_ids, attention_mask"):
        remote(prompt(), cache_position=torch.arange(12))


def test_generate_continues_a_cache_whose_forward_is_still_queued(
    pair: tuple[Any, RemoteModel],
) -> None:
    """Prefill with a forward, then generate from its cache: the forward is still queued
    when generate is called, and what it made stays the client's afterwards."""
    local, remote = pair
    ids = prompt()
    longer = torch.cat([ids, ids[:, :1]], -1)
    with torch.no_grad():
        first = local(ids)
        expected = local.generate(longer, past_key_values=first.past_key_values, max_new_tokens=4)
    out = remote(ids)
    got = remote.generate(longer, past_key_values=out.past_key_values, max_new_tokens=4)
    assert torch.equal(got, expected)
    torch.testing.assert_close(out.logits.cpu(), first.logits)


def test_settings_transformers_refuses_are_usage_errors(pair: tuple[Any, RemoteModel]) -> None:
    """transformers checks some settings only as it builds its processors, on the server."""
    _, remote = pair
    for bad in ({"do_sample": True, "temperature": 0.0}, {"repetition_penalty": 0.0}):
        with pytest.raises(RemoteUsageError, match="cannot generate: ValueError: `"):
            remote.generate(prompt(), max_new_tokens=2, **bad)
    with pytest.raises(ValueError):  # caught as the local refusal is
        remote.generate(prompt(), max_new_tokens=2, do_sample=True, top_k=-1)
    assert remote.generate(prompt(), max_new_tokens=2).shape == (1, 14)


def test_a_cache_generate_grows_counts_against_the_session(server: ServerProcess) -> None:
    model = FAMILIES["gpt2"](seed=6)
    per_token = 2 * model.config.n_layer * model.config.n_embd * 4
    with RemoteModel(model, server.address) as remote, djinn.connect(server.address) as observer:
        out = remote(prompt())
        out.logits[:, -1].argmax(-1).tolist()  # run it: the cache is held
        before = observer.server_stats()["resident_bytes"]
        longer = torch.cat([prompt(), prompt()[:, :1]], -1)
        remote.generate(longer, past_key_values=out.past_key_values, max_new_tokens=20)
        assert observer.server_stats()["resident_bytes"] >= before + 16 * per_token  # of 20


def test_local_weights_edited_after_wrapping_are_seen(server: ServerProcess) -> None:
    model = FAMILIES["gpt2"](seed=5)
    with RemoteModel(model, server.address) as remote:
        before = remote.fingerprint
        with torch.no_grad():
            model.lm_head.weight.mul_(-1.0)
            expected = model.generate(prompt(), max_new_tokens=6)
        assert torch.equal(remote.generate(prompt(), max_new_tokens=6), expected)
        assert remote.fingerprint != before


def test_cancel_stops_the_generate_within_a_step_and_the_session_carries_on(
    server: ServerProcess,
) -> None:
    model = FAMILIES["gpt2"]()
    with RemoteModel(model, server.address) as remote, djinn.connect(server.address) as observer:
        started = time.perf_counter()
        for i, _ in enumerate(remote.stream(prompt(), max_new_tokens=200)):
            if i == 3:
                break  # leaving the loop cancels it on the server
        freed = _device_free_after(observer, started)
        assert freed < 2.0
        with pytest.raises(DjinnTimeoutError, match="timeout="):
            remote.generate(prompt(batch=16), max_new_tokens=200, timeout=0.3)
        assert _device_free_after(observer, time.perf_counter()) < 2.0
        assert torch.equal(
            remote.generate(prompt(), max_new_tokens=4), model.generate(prompt(), max_new_tokens=4)
        )


class _Interrupt:
    def put(self, value: torch.Tensor) -> None:
        self.n = getattr(self, "n", 0) + 1
        if self.n == 3:
            raise KeyboardInterrupt

    def end(self) -> None:
        pass


def test_ctrl_c_cancels_the_generate_on_the_server(server: ServerProcess) -> None:
    model = FAMILIES["gpt2"]()
    with RemoteModel(model, server.address) as remote, djinn.connect(server.address) as observer:
        with pytest.raises(KeyboardInterrupt):
            remote.generate(prompt(), max_new_tokens=200, streamer=_Interrupt())
        assert _device_free_after(observer, time.perf_counter()) < 2.0
        assert remote.generate(prompt(), max_new_tokens=2).shape == (1, 14)


def _device_free_after(observer: djinn.Client, since: float) -> float:
    while observer.server_stats()["queued_calls"]:
        time.sleep(0.005)
    return time.perf_counter() - since


def test_two_threads_generate_on_one_client(server: ServerProcess) -> None:
    model = FAMILIES["llama"]()
    with RemoteModel(model, server.address) as remote:
        results: dict[int, torch.Tensor] = {}

        def run(seed: int) -> None:
            results[seed] = remote.generate(prompt(seed=seed), max_new_tokens=8)

        threads = [threading.Thread(target=run, args=(seed,)) for seed in (1, 2, 3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    for seed, got in results.items():
        assert torch.equal(got, model.generate(prompt(seed=seed), max_new_tokens=8))
