"""Vajra's client SDK: a Trio client, a blocking client, and the values and errors they share.

::

    from vajra.client import AsyncClient, Client

    with Client("tcp://127.0.0.1:5555", api_key="...") as client:
        print(client.infer("Hello", max_tokens=16).text)

    async with AsyncClient("tcp://127.0.0.1:5555", api_key="...") as client:
        async with client.stream("Hello") as chunks:
            async for chunk in chunks:
                print(chunk.text, end="")

Every generation call takes the decoding parameters as keywords (:class:`SamplingOptions`:
``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``stop``, ``seed``, ``stop_token_ids``,
``min_tokens``, the penalties, ``ignore_eos``, ``logprobs``, ``prompt_logprobs``,
``structured`` or ``response_format``), as ``params=SamplingParams(...)``, or both; and
``n=`` for several choices (``result.choices``; streamed chunks say their ``choice``).

Every failure is raised as a :class:`VajraError` subclass; :class:`TimeoutError` is also the
builtin ``TimeoutError``; ``error.retriable`` says whether sending again may succeed.

Fine-tuning: ``client.train(adapter, dataset, epochs=..., ...)`` queues a training job and
returns its handle (:class:`TrainingJob` / :class:`AsyncTrainingJob`: ``status()``,
``follow()``, ``wait()``, ``cancel()``, ``resume()``); ``client.job(id)``, ``client.jobs()``.
"""

from vajra.bus.messages import TokenLogprob
from vajra.client._async import AsyncClient
from vajra.client._decoding import MAX_CHOICES, SamplingOptions
from vajra.client._fanout_async import FanoutStream
from vajra.client._jobs import JobInfo, TrainingJob
from vajra.client._jobs_async import AsyncTrainingJob, JobFollow
from vajra.client._stream import Stream
from vajra.client._sync import Client
from vajra.client._types import (
    AdapterInfo,
    Choice,
    ExecutorStatus,
    InferenceResult,
    IssuedKey,
    StreamChunk,
    Tenant,
    TenantUsage,
    Usage,
)
from vajra.client._usage import UsageReport
from vajra.errors import (
    AuthError,
    Cancelled,
    InternalError,
    InvalidRequest,
    NotFoundError,
    OverloadedError,
    PayloadTooLarge,
    ProtocolError,
    QuotaExceeded,
    RateLimited,
    TimeoutError,
    UnavailableError,
    VajraError,
)
from vajra.policies.decoding import SamplingParams, StructuredOutput

__all__ = [
    "MAX_CHOICES",
    "AdapterInfo",
    "AsyncClient",
    "AsyncTrainingJob",
    "AuthError",
    "Cancelled",
    "Choice",
    "Client",
    "ExecutorStatus",
    "FanoutStream",
    "InferenceResult",
    "InternalError",
    "InvalidRequest",
    "IssuedKey",
    "JobFollow",
    "JobInfo",
    "NotFoundError",
    "OverloadedError",
    "PayloadTooLarge",
    "ProtocolError",
    "QuotaExceeded",
    "RateLimited",
    "SamplingOptions",
    "SamplingParams",
    "Stream",
    "StreamChunk",
    "StructuredOutput",
    "Tenant",
    "TenantUsage",
    "TimeoutError",
    "TokenLogprob",
    "TrainingJob",
    "UnavailableError",
    "Usage",
    "UsageReport",
    "VajraError",
]
