"""Plain PyTorch on server-held tensors: results match local ones, and only what is read crosses."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import djinn
from djinn import RemoteModel, RemoteTensor, messages
from djinn.errors import RemoteUsageError, UsageError
from djinn.net.codec import OutgoingTuple
from djinn.semantics import Decision
from djinn.server.sessions import REF_OVERHEAD_BYTES
from harness.server import ServerProcess
from tests.models import VOCAB, prompt, tiny_gpt2

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_gpt2(seed=11)


@pytest.fixture
def rm(server: ServerProcess, model: torch.nn.Module) -> Iterator[RemoteModel]:
    with RemoteModel(model, server.address) as remote:
        yield remote


@pytest.fixture
def pair(rm: RemoteModel, model: torch.nn.Module) -> tuple[RemoteTensor, torch.Tensor]:
    """The same logits, held by the server and computed locally: [1, 16, VOCAB]."""
    ids = prompt(length=16)
    remote = rm(ids).logits
    with torch.no_grad():
        local = model(ids).logits
    assert isinstance(remote, RemoteTensor)
    return remote, local


def calls(rm: RemoteModel) -> int:
    return int(rm.stats()["calls"])


def test_user_written_greedy_loop_reading_each_token_is_one_round_trip_per_step(
    rm: RemoteModel, model: torch.nn.Module
) -> None:
    ids = prompt(length=20)
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=30, do_sample=False)
    tokens, step, cache = [ids], ids, None
    per_step = []
    for _ in range(30):
        before = (calls(rm), rm.stats()["bytes_sent"] + rm.stats()["bytes_received"])
        out = rm(step, past_key_values=cache)
        step = out.logits[:, -1].argmax(-1, keepdim=True)
        cache = out.past_key_values
        tokens.append(step.cpu())  # read it: forward, index, argmax and the read in one trip
        after = (calls(rm), rm.stats()["bytes_sent"] + rm.stats()["bytes_received"])
        assert after[0] - before[0] == 1
        per_step.append(after[1] - before[1])
    assert torch.equal(torch.cat(tokens, dim=-1), expected)
    assert max(per_step[1:]) < 1024, per_step


def test_a_loop_that_only_passes_tokens_back_costs_no_round_trip_until_it_reads(
    rm: RemoteModel, model: torch.nn.Module
) -> None:
    ids = prompt(length=20)
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=30, do_sample=False)[:, 20:]
    start = calls(rm)
    step, cache, tokens = ids, None, []
    for _ in range(30):
        out = rm(step, past_key_values=cache)
        step = out.logits[:, -1].argmax(-1, keepdim=True)  # stays queued, as on a GPU
        cache = out.past_key_values
        tokens.append(step)
    assert calls(rm) == start
    first = tokens[0].cpu()  # one call runs all 30 steps and brings every token back
    assert calls(rm) == start + 1
    assert torch.equal(torch.cat([first] + [t.cpu() for t in tokens[1:]], dim=-1), expected)
    assert calls(rm) == start + 1


def test_shipping_the_logits_instead_costs_a_row_per_step(rm: RemoteModel) -> None:
    out = rm(prompt(length=8))
    before = rm.stats()["bytes_received"]
    out.logits[:, -1].argmax(-1).item()
    token_bytes = rm.stats()["bytes_received"] - before
    before = rm.stats()["bytes_received"]
    out.logits[:, -1].cpu().argmax(-1)
    assert rm.stats()["bytes_received"] - before > VOCAB * 4 > 10 * token_bytes


OPS: list[tuple[str, Any]] = [
    ("softmax", lambda t: t.softmax(-1)),
    ("log_softmax", lambda t: torch.log_softmax(t, dim=-1)),
    ("topk-values", lambda t: t[0, -1].topk(5).values),
    ("topk-indices", lambda t: torch.topk(t[0, -1], 5).indices),
    ("matmul", lambda t: t[0] @ t[0].T),
    ("arithmetic", lambda t: (t * 2 + 1 - t / 3) ** 2),
    ("reverse-ops", lambda t: 1 - 2 / (t.abs() + 1)),
    ("indexing", lambda t: t[0, 3:9:2, ::7]),
    ("ellipsis", lambda t: t[..., -1]),
    ("newaxis", lambda t: t[:, None, -1]),
    ("cat", lambda t: torch.cat([t[:, :2], t[:, -2:]], dim=1)),
    ("reductions", lambda t: t.max(dim=-1).values.mean()),
    ("compare", lambda t: (t > 0).sum(-1)),
    ("where", lambda t: torch.where(t > 0, t, t * 0.1)),
    ("functional", lambda t: torch.nn.functional.gelu(t)),
    ("reshape", lambda t: t.reshape(4, 4, -1).permute(2, 0, 1).contiguous()),
    ("boolean-mask", lambda t: t[t > 2.0]),
]


@pytest.mark.parametrize("fn", [f for _, f in OPS], ids=[n for n, _ in OPS])
def test_operations_match_local_results(pair: tuple[RemoteTensor, torch.Tensor], fn: Any) -> None:
    remote, local = pair
    result = fn(remote)
    expected = fn(local)
    value = result.cpu() if isinstance(result, RemoteTensor) else result
    assert value.shape == expected.shape and value.dtype == expected.dtype
    torch.testing.assert_close(value, expected)


def test_mixing_local_tensors_and_scalars(pair: tuple[RemoteTensor, torch.Tensor]) -> None:
    remote, local = pair
    bias = torch.randn(VOCAB)
    torch.testing.assert_close((remote + bias).cpu(), local + bias)
    torch.testing.assert_close((bias + remote).cpu(), bias + local)  # torch.Tensor.__add__ defers


def test_a_chain_is_one_round_trip_and_shapes_cost_nothing(
    rm: RemoteModel, pair: tuple[RemoteTensor, torch.Tensor]
) -> None:
    remote, local = pair
    start = calls(rm)
    probs = remote[:, -1].softmax(-1)
    assert isinstance(probs, RemoteTensor) and probs.shape == (1, VOCAB)
    assert probs.dtype == torch.float32 and calls(rm) == start  # inferred, not asked
    top = probs.topk(5)
    assert calls(rm) == start  # still only queued
    values = top.values.cpu()
    assert calls(rm) == start + 1  # the chain ran once, when a result was read...
    expected = local[:, -1].softmax(-1).topk(5)
    torch.testing.assert_close(values, expected.values)
    assert torch.equal(top.indices.cpu(), expected.indices)
    assert calls(rm) == start + 1  # ...and the other small result came back with it


def test_materializers(pair: tuple[RemoteTensor, torch.Tensor]) -> None:
    remote, local = pair
    row = remote[0, -1, :3]
    assert row.tolist() == pytest.approx(local[0, -1, :3].tolist(), abs=1e-5)
    big = remote[0]
    torch.testing.assert_close(torch.as_tensor(big), local[0])
    torch.testing.assert_close(torch.from_numpy(big.numpy()), local[0])
    assert big.max().item() == pytest.approx(local[0].max().item(), abs=1e-5)
    assert bool((big > -1e9).all()) is True
    assert str(remote[0]).startswith("RemoteTensor(tensor([[")  # printing reads it
    assert repr(remote).startswith("RemoteTensor(shape=[1, 16, 2000]")


def test_errors_on_the_server_point_at_the_users_line(
    pair: tuple[RemoteTensor, torch.Tensor],
) -> None:
    remote, _ = pair
    index = torch.full((1, 16, VOCAB), VOCAB + 7)  # valid shape, out-of-range values
    picked, line = remote.gather(-1, index), inspect.currentframe().f_lineno  # type: ignore[union-attr]
    assert isinstance(picked, RemoteTensor)  # large, so queued: meta inference saw no values
    with pytest.raises(RemoteUsageError, match=r"cannot run Tensor\.gather") as info:
        picked.cpu()
    assert f"test_remote_tensor.py:{line} in test_errors_on" in str(info.value)


def test_a_queued_out_of_vocabulary_token_fails_its_batch_at_its_line(rm: RemoteModel) -> None:
    out = rm(prompt(length=8))
    bad = out.logits[:, -1].argmax(-1, keepdim=True) + VOCAB  # computed on the server
    after, line = rm(bad, past_key_values=out.past_key_values), inspect.currentframe().f_lineno  # type: ignore[union-attr]
    with pytest.raises(RemoteUsageError, match="outside the vocabulary") as info:
        after.logits[:, -1].argmax(-1).item()
    assert f"test_remote_tensor.py:{line} in test_a_queued" in str(info.value)
    assert rm.generate(prompt(), max_new_tokens=2).shape == (1, 14)  # the session goes on


def test_a_queued_out_of_range_index_fails_at_its_line_and_keeps_what_came_before(
    rm: RemoteModel, model: torch.nn.Module
) -> None:
    logits = rm(prompt(length=8)).logits  # queued, like everything up to the read
    far = logits[:, -1].argmax(-1) + VOCAB  # computed on the server: checked only there
    picked, line = logits[0].index_select(-1, far), inspect.currentframe().f_lineno  # type: ignore[union-attr]
    with pytest.raises(RemoteUsageError, match=r"outside \[0, \d+\)") as info:
        picked.cpu()
    assert f"test_remote_tensor.py:{line} in test_a_queued_out_of_range" in str(info.value)
    with torch.no_grad():
        expected = model(prompt(length=8)).logits[:, -1].argmax(-1)
    assert torch.equal(logits[:, -1].argmax(-1).cpu(), expected)  # made before the failure


def test_shape_errors_are_raised_at_once_by_meta_inference(
    pair: tuple[RemoteTensor, torch.Tensor],
) -> None:
    remote, _ = pair
    with pytest.raises(RuntimeError, match="broadcast"):
        remote + torch.ones(3)


def test_unsupported_operations_say_which_and_why(pair: tuple[RemoteTensor, torch.Tensor]) -> None:
    remote, _ = pair
    with pytest.raises(UsageError, match="cannot run fft_fft on a RemoteTensor"):
        torch.fft.fft(remote)
    with pytest.raises(AttributeError, match="no attribute 'fill_'"):
        remote.fill_(1)


def test_in_place_changes_show_through_every_name_of_the_tensor(
    pair: tuple[RemoteTensor, torch.Tensor],
) -> None:
    remote, local = pair
    alias = remote
    remote += 1  # as torch: the same tensor changes, so every name bound to it sees it
    remote.mul_(2)
    assert remote is alias
    torch.testing.assert_close(alias.cpu(), (local + 1) * 2)
    ids = remote.argmax(-1)
    with pytest.raises(RuntimeError, match="can't be cast to the desired output type"):
        ids += 0.5  # as torch refuses
    with pytest.raises(RuntimeError, match="doesn't match the broadcast shape"):
        ids += torch.ones(2, 1, 1)


def test_a_float32_tensor_stays_float32_when_a_double_is_added_in_place(
    pair: tuple[RemoteTensor, torch.Tensor],
) -> None:
    remote, local = pair
    remote += remote.double()
    assert remote.dtype == torch.float32
    torch.testing.assert_close(remote.cpu(), local * 2)


def test_a_change_through_a_view_works_and_the_viewed_tensor_refuses_use(
    pair: tuple[RemoteTensor, torch.Tensor],
) -> None:
    """The sampling idiom `last = logits[:, -1]; last /= t` gives torch's result; the
    logits themselves, which torch would show changed, refuse to be used or read."""
    remote, local = pair
    last = remote[:, -1]
    last /= 0.5
    torch.testing.assert_close(last.cpu(), local[:, -1] / 0.5)
    with pytest.raises(UsageError, match="changed in place through a view"):
        remote.cpu()
    with pytest.raises(UsageError, match="changed in place through a view"):
        remote.sum()


def test_a_change_through_an_alias_or_a_read_view_reaches_the_viewed_tensors_checks(
    rm: RemoteModel,
) -> None:
    ids = prompt(length=6)
    logits = rm(ids).logits
    same = logits.float()  # torch returns the tensor itself: a change shows in both
    same /= 2
    with pytest.raises(UsageError, match="changed in place through a view"):
        logits.softmax(-1)
    read_first = rm(ids).logits
    read_first.cpu()  # read before the change: its fetched values must not be shown
    row = read_first[0]  # computed here, a view of the fetched values: torch's semantics
    row += 1
    torch.testing.assert_close(read_first.cpu()[0], row)
    unread = rm(ids).logits
    view = unread[0]
    view.cpu()
    view[0, 0] = 5.0  # a change to a read view's values: the viewed tensor is out of date
    with pytest.raises(UsageError, match="changed in place through a view"):
        unread.cpu()


def test_in_place_names_follow_torch(pair: tuple[RemoteTensor, torch.Tensor]) -> None:
    remote, _ = pair
    with pytest.raises(AttributeError, match="no attribute 'softmax_'"):
        remote.softmax_(-1)  # torch has no softmax_ either
    with pytest.raises(UsageError, match="changes the shape, which djinn does not do in place"):
        remote.unsqueeze_(0)


def test_values_edited_under_inference_mode_are_what_later_operations_use(
    rm: RemoteModel, model: torch.nn.Module
) -> None:
    ids = prompt(length=6)
    with torch.inference_mode():  # fetched values keep no version counter here
        tokens = rm(ids).logits.argmax(-1)
        tokens.cpu()
        tokens[0, 0] = 7
        tokens += 1
        with torch.no_grad():
            expected = model(tokens.cpu()).logits
        torch.testing.assert_close(rm(tokens).logits.cpu(), expected, rtol=1e-4, atol=1e-4)


def test_views_made_before_an_in_place_change_refuse_use(
    pair: tuple[RemoteTensor, torch.Tensor],
) -> None:
    remote, local = pair
    first, untouched = remote[0], remote.softmax(-1)
    remote -= 1
    with pytest.raises(UsageError, match="the tensor it views was changed in place"):
        first.cpu()
    torch.testing.assert_close(untouched.cpu(), local.softmax(-1))  # a new tensor, not a view
    torch.testing.assert_close(remote[0].cpu(), local[0] - 1)


def test_fetched_values_changed_here_are_what_later_operations_use(
    rm: RemoteModel, model: torch.nn.Module
) -> None:
    ids = prompt(length=6)
    tokens = rm(ids).logits.argmax(-1)
    tokens.cpu()
    tokens[0, 0] = 7  # the fetched values change here, as a local tensor's would
    with torch.no_grad():
        expected = model(tokens.cpu()).logits
    torch.testing.assert_close(rm(tokens).logits.cpu(), expected, rtol=1e-4, atol=1e-4)
    other = rm(ids).logits  # an unread tensor: the op runs on the server with our values
    expected_sum = (tokens.cpu().float().sum() + other.cpu().sum()).item()
    assert (tokens.float().sum() + other.sum()).item() == pytest.approx(expected_sum, rel=1e-5)
    with pytest.raises(UsageError, match="cannot assign into a RemoteTensor before reading it"):
        rm(ids).logits[0] = 0


def test_tensors_of_two_sessions_do_not_mix(server: ServerProcess, model: torch.nn.Module) -> None:
    with (
        djinn.connect(server.address) as client,
        RemoteModel(model, client) as a,
        RemoteModel(model, client) as b,
    ):
        x, y = a(prompt()).logits, b(prompt()).logits
        with pytest.raises(UsageError, match="mixes tensors of 2 sessions"):
            x + y
        with pytest.raises(UsageError, match="another RemoteModel's session"):
            b(
                x[:, -1:].argmax(-1) * 0 + prompt(length=1),
                past_key_values=a(prompt()).past_key_values,
            )


def test_freed_remote_tensors_release_server_memory(tmp_path: Path, model: torch.nn.Module) -> None:
    with (
        ServerProcess("--store", str(tmp_path), "--device", "cpu") as proc,
        djinn.connect(proc.address) as observer,
        RemoteModel(model, proc.address) as rm,
    ):
        logits = rm(prompt(length=16), use_cache=False).logits
        held = [logits * i for i in range(20)]  # 20 x 128 KB on the server
        rm.synchronize()
        full = observer.server_stats()["resident_bytes"]
        assert full >= 21 * logits.nbytes
        del held
        rm.synchronize()
        # the logits' storage and one reference's bookkeeping
        assert (
            observer.server_stats()["resident_bytes"] == logits.nbytes + REF_OVERHEAD_BYTES < full
        )


def test_decision_record_shows_data_and_references_per_operation(
    rm: RemoteModel, pair: tuple[RemoteTensor, torch.Tensor]
) -> None:
    remote, _ = pair
    remote[:, -1].softmax(-1).argmax(-1).item()
    records = [(r.op, r.value, r.decision, r.bytes) for r in rm.decisions]
    assert ("__getitem__", "output", Decision.REFERENCE, 0) in records
    assert ("softmax", "output", Decision.REFERENCE, 0) in records
    assert ("argmax", "output", Decision.REFERENCE, 0) in records  # until read...
    assert ("read", "argmax", Decision.DATA, 8) in records  # ...then its 8 bytes cross
    assert ("softmax", "input", Decision.REFERENCE, 0) in records


def test_blind_policy_returns_every_result_as_data(
    server: ServerProcess, model: torch.nn.Module
) -> None:
    with RemoteModel(model, server.address, policy="semantic_blind") as blind:
        out = blind(prompt())
        assert isinstance(out.logits, torch.Tensor)  # nothing stays remote to compute on


def test_sampling_on_the_server_repeats_under_the_same_seed(
    pair: tuple[RemoteTensor, torch.Tensor],
) -> None:
    remote, _ = pair
    probs = remote[0, -1].softmax(-1)

    def sample(**kwargs: Any) -> list[int]:
        result: list[int] = torch.multinomial(probs, 8, replacement=True, **kwargs).tolist()
        return result

    torch.manual_seed(3)
    first = sample()
    torch.manual_seed(3)
    assert sample() == first  # the caller's RNG seeds the server's draw
    assert sample() != first  # ...and moves on, as local sampling does
    generator = torch.Generator().manual_seed(5)
    mine = sample(generator=generator)
    assert sample(generator=torch.Generator().manual_seed(5)) == mine
    assert sample(generator=generator) != mine


def test_the_server_refuses_a_seed_for_an_operation_that_draws_nothing(
    rm: RemoteModel, pair: tuple[RemoteTensor, torch.Tensor]
) -> None:
    remote, _ = pair
    session = rm._session
    out = session.new_ref()
    session.enqueue(
        messages.TensorOp("torch.exp", OutgoingTuple([remote.ref]), {}, [out.id], seed=1), "exp"
    )
    with pytest.raises(RemoteUsageError, match=r"cannot seed torch\.exp"):
        session.run()


@pytest.mark.parametrize("policy", ["full", "partially_aware"])
def test_changing_the_last_row_in_place_makes_the_logits_refuse_use(
    server: ServerProcess, model: torch.nn.Module, policy: str
) -> None:
    """Whether the last row is read after the forward (full) or came with its reply
    (partially_aware), dividing it in place leaves the logits torch would show changed,
    which djinn's server cannot: they refuse use, under inference_mode too."""
    with RemoteModel(model, server.address, policy=policy) as rm, torch.inference_mode():
        out = rm(prompt(length=6))
        last = out.logits[:, -1]
        assert isinstance(last, torch.Tensor) == (policy == "partially_aware")
        before = torch.as_tensor(last).clone()
        last /= 2
        torch.testing.assert_close(torch.as_tensor(last), before / 2)
        with pytest.raises(UsageError, match="changed in place through a view"):
            out.logits.cpu()


def test_found_by_trying_in_place_changes_as_a_user_does(
    rm: RemoteModel, model: torch.nn.Module
) -> None:
    """Each case gives torch's values or a UsageError, never other values."""
    ids = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        local = model(ids).logits
    scores = rm(ids).logits
    first = scores[:, 0]
    scores *= 2
    scores = scores.softmax(-1)  # the changed tensor's only name now names another
    with pytest.raises(UsageError, match="the tensor it views was changed in place"):
        first.cpu()  # torch shows it doubled
    logits = rm(ids).logits
    copied = logits.to(torch.float32, copy=True)  # a copy, though of the same dtype
    copied += 100
    torch.testing.assert_close(logits.cpu(), local, rtol=1e-4, atol=1e-4)
    logits = rm(ids).logits
    last = logits[:, -1]
    logits.cpu()
    logits[:, -1].div_(2)  # through the fetched values: the view made before is out of date
    with pytest.raises(UsageError, match="the tensor it views was changed in place"):
        last.cpu()
    square = rm(ids).logits[0, :, :5] * 1
    flipped = torch.einsum("ij->ji", square)  # a view, though of the second argument
    flipped += 1
    with pytest.raises(UsageError, match="changed in place through a view"):
        square.cpu()
    with pytest.raises(UsageError, match="inplace=True"):
        torch.nn.functional.relu(rm(ids).logits, inplace=True)
    with pytest.raises(RuntimeError, match="single memory location"):
        rm(ids).logits[:, -1:].expand(2, 3, VOCAB).add_(1)  # as torch refuses
    with pytest.raises(RuntimeError, match="doesn't match the broadcast shape"):
        logits = rm(ids).logits
        logits += torch.ones(3, 2, 1, 1)


def test_copies_torch_makes_are_copies_here(rm: RemoteModel, model: torch.nn.Module) -> None:
    """contiguous() and reshape() of a strided view copy in torch, and so here: a change to
    the copy leaves the tensor usable."""
    ids = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        local = model(ids).logits
    logits = rm(ids).logits
    row = logits[:, -1].contiguous()  # batch 2: the last rows are not contiguous
    row.add_(1)
    flat = logits.transpose(0, 1).reshape(-1)
    flat += 1
    scaled = logits[:, -1, :].to(copy=True, dtype=torch.float32)  # transformers' sampling
    scaled /= 0.7
    torch.testing.assert_close(logits.sum().item(), local.sum().item(), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(row.cpu(), local[:, -1] + 1, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scaled.cpu(), local[:, -1] / 0.7, rtol=1e-4, atol=1e-4)


def test_sampling_by_method_and_torch_errors_on_the_server_are_runtime_errors(
    pair: tuple[RemoteTensor, torch.Tensor],
) -> None:
    remote, _ = pair
    probs = remote[0, -1].softmax(-1)
    torch.manual_seed(4)
    first = probs.multinomial(3).tolist()
    torch.manual_seed(4)
    assert probs.multinomial(3).tolist() == first
    with pytest.raises(RuntimeError):  # as torch raises it: too many samples without replacement
        torch.multinomial(probs, VOCAB + 1).cpu()


def test_an_operand_that_views_the_target_s_tensor_is_refused(rm: RemoteModel) -> None:
    """Over overlapping views torch's result depends on the order it writes in (a
    running sum here); djinn computes the new value at once, so it refuses rather than
    give other values. The tensor itself as its own operand is fine, as in torch."""
    ids = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(10))
    column = rm(ids).logits[:, :, :1]
    later = column[:, 1:]
    with pytest.raises(UsageError, match="views the same tensor as its target"):
        later.add_(column[:, :-1])
    logits = rm(ids).logits
    with pytest.raises(UsageError, match="views the same tensor as its target"):
        logits += logits[0]
    doubled = rm(ids).logits
    expected = doubled.cpu() * 2
    doubled = rm(ids).logits
    doubled += doubled
    torch.testing.assert_close(doubled.cpu(), expected)


def test_tensors_like_a_remote_one_are_made_on_the_server(
    pair: tuple[RemoteTensor, torch.Tensor],
) -> None:
    remote, local = pair
    masked = torch.where(remote > 0, remote, torch.zeros_like(remote))
    torch.testing.assert_close(masked.cpu(), torch.where(local > 0, local, torch.zeros_like(local)))
    filled = torch.full_like(remote[0, -1], -1.0, dtype=torch.float64) + torch.ones_like(remote)
    assert filled.dtype == torch.float64
    torch.testing.assert_close(filled.cpu(), torch.zeros_like(local, dtype=torch.float64))
    with pytest.raises(UsageError, match="keeps its values on its device"):
        torch.zeros_like(remote, device="cpu")
