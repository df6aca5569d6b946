"""The blocking client's calls of several requests at once: ``n`` choices, and results that
are read as streams (see :mod:`vajra.client._choices`).

Every request of a call is sent before any answer is read, all under one deadline; the
thread's socket then parks each reply in its request's inbox, so the answers are read in any
order. The first error is raised as it is; every request not answered by then is cancelled
at the gateway.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Generator, Mapping
from contextlib import ExitStack
from typing import TYPE_CHECKING

from vajra.bus.messages import ErrorReply, InferRequest
from vajra.client._calls import Calls
from vajra.client._choices import base_request_id, gather, merge
from vajra.client._replies import Reply, StreamProgress, expect, interpret_reply
from vajra.client._types import InferenceResult, StreamChunk
from vajra.errors import TimeoutError, UnavailableError

if TYPE_CHECKING:
    from vajra.client._sync import Client, _ThreadState


def infer_all(
    client: Client, requests: list[InferRequest], timeout_s: float, *, streamed: bool
) -> InferenceResult:
    """Send ``requests`` together and merge their results (``streamed``: each read as a
    stream and gathered)."""
    if streamed:
        chunks: list[list[StreamChunk]] = [[] for _ in requests]
        for chunk in stream_all(client, requests, timeout_s):
            chunks[chunk.choice].append(chunk)
        results = [gather(c) for c in chunks]
    else:
        results = _run_all(client, requests, timeout_s)
    return merge(results, base_request_id(requests))


def _run_all(
    client: Client, requests: list[InferRequest], timeout_s: float
) -> list[InferenceResult]:
    state = client._state()
    deadline = time.monotonic() + timeout_s
    unanswered = {r.request_id: r for r in requests}
    with ExitStack() as stack:
        for r in requests:
            stack.enter_context(client._register(state, r.request_id))
        try:
            for r in requests:
                client._send(state, r, deadline, timeout_s)
            results = []
            for r in requests:
                call = Calls.infer(r, timeout_s)
                while True:
                    reply = client._next_reply(state, r.request_id, deadline, timeout_s)
                    if isinstance(reply, ErrorReply):
                        del unanswered[r.request_id]
                    outcome = interpret_reply(reply)
                    if outcome is not None:
                        unanswered.pop(r.request_id, None)
                        results.append(call.finish(outcome))
                        break
            return results
        finally:
            for r in unanswered.values():
                client._cancel(state, r)


def stream_all(
    client: Client, requests: list[InferRequest], timeout_s: float
) -> Generator[StreamChunk, None, None]:
    """The chunks of every request, as they come (``chunk.choice``: the request's index),
    until each has sent its final chunk. Sent when iteration starts."""
    state = client._state()
    deadline = time.monotonic() + timeout_s
    open_ = {r.request_id: (i, r, StreamProgress()) for i, r in enumerate(requests)}
    with ExitStack() as stack:
        for r in requests:
            stack.enter_context(client._register(state, r.request_id))
        try:
            for r in requests:
                client._send(state, r, deadline, timeout_s)
            while open_:
                rid, reply = _next_of(client, state, open_, deadline, timeout_s)
                choice, _, progress = open_[rid]
                if isinstance(reply, ErrorReply):
                    del open_[rid]  # answered: nothing to cancel
                chunk = expect(interpret_reply(reply, progress), StreamChunk)
                if progress.finished:
                    open_.pop(rid, None)
                yield dataclasses.replace(chunk, choice=choice) if choice else chunk
        finally:  # also when the caller stops early (GeneratorExit)
            for _, r, _ in open_.values():
                client._cancel(state, r)


def _next_of(
    client: Client,
    state: _ThreadState,
    rids: Mapping[str, object],
    deadline: float,
    timeout_s: float,
) -> tuple[str, Reply]:
    """The next reply for any request of ``rids``, reading the socket until one comes."""
    while True:
        for rid in rids:
            inbox = state.inbox[rid]
            if inbox:
                return rid, inbox.popleft()
        if client._closed:
            raise UnavailableError("the client was closed before the answer came")
        if time.monotonic() >= deadline:
            first = next(iter(rids))
            raise TimeoutError(f"no answer to request {first} within {timeout_s:g} s")
        frames, dropped = state.dealer.receive(deadline)
        if dropped:
            client._on_disconnect(state)
        if frames is not None:
            client._route(state, frames)
