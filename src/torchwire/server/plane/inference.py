"""The data plane: one inference, from a request's bytes to its answer's, for every transport.

The seed and V2 gRPC servicers, the REST API and the native front end hand their requests here:
the plane finds the model version, admits the call before anything is decoded (a full queue, or
a deadline the queued work would outlast, is refused at once), decodes with the API's codec,
and the returned inference queues it (``submit`` on the event loop, ``enqueue`` from any thread)
and encodes the answer. Accounting is the ``Call``'s (``observe``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tritonclient.grpc import service_pb2 as pb

from torchwire.errors import DeadlineExceededError, ModelNotFoundError, VersionClosedError
from torchwire.repository import ModelRepository
from torchwire.runtime import Batcher, Done, Ticket
from torchwire.runtime.arrays import Arrays
from torchwire.server.codecs.seed_codec import decode_request, encode_response
from torchwire.server.codecs.seed_wire import parse_request
from torchwire.server.codecs.v2_codec import (
    Encoded,
    InferRequest,
    ShmTarget,
    check_shm_outputs,
    decode_infer,
    encode_infer,
    output_targets,
    requested_outputs,
)
from torchwire.server.common.observe import Call
from torchwire.server.common.shm import Regions


def require_model_name(name: str) -> None:
    """V2 has no default model: every request names its model."""
    if not name:
        raise ModelNotFoundError("no model name given; V2 requests must name their model")


@dataclass(slots=True)
class _Admitted:
    """A request admitted and decoded for its model version, not yet queued."""

    call: Call
    batcher: Batcher
    arrays: Arrays
    deadline: float | None
    again: Callable[[], _Admitted]
    """Find, admit and decode the same request again."""

    def submit(self) -> asyncio.Future[Arrays]:
        """Queue it from the event loop, where it was found (no reload ran in between); the
        future resolves to its own rows."""
        return self.batcher.submit(self.arrays, self.call.items, self.deadline)

    def enqueue(self, done: Done) -> Ticket:
        """Queue it from any thread; ``done`` gets its rows or its error (``Batcher.enqueue``:
        then ``dispatch``)."""
        try:
            return self.batcher.enqueue(self.arrays, self.call.items, self.deadline, done)
        except VersionClosedError:
            self._found_again()
            return self.batcher.enqueue(self.arrays, self.call.items, self.deadline, done)

    def _found_again(self) -> None:
        """Become the same request found anew: a reload retired its version after it was found
        (on another thread than the reload's), and the version served now takes it. Raises
        what finding it raises (``VersionClosedError`` if the server is stopping)."""
        fresh = self.again()
        for name in (f.name for f in dataclasses.fields(self)):
            setattr(self, name, getattr(fresh, name))


@dataclass(slots=True)
class SeedInference(_Admitted):
    """A seed ``PredictRequest``."""

    raw: bool = False

    def encode(self, outputs: Arrays) -> bytes:
        return encode_response(outputs, self.raw, time.perf_counter() - self.call.started)


@dataclass(slots=True)
class V2Inference(_Admitted):
    """A V2 ``ModelInferRequest`` (gRPC)."""

    message: pb.ModelInferRequest = field(default_factory=pb.ModelInferRequest)
    selected: list[int] = field(default_factory=list)
    regions: Regions | None = None
    targets: dict[str, ShmTarget] = field(default_factory=dict)  # outputs into shared memory

    def encode(self, outputs: Arrays) -> Encoded:
        batcher = self.batcher
        return encode_infer(
            self.message,
            batcher.model,
            batcher.name,
            batcher.version,
            outputs,
            self.selected,
            self.regions,
            self.targets,
        )


class DataPlane:
    """Find, admit, decode and queue requests of every API on the repository's batchers."""

    def __init__(self, repository: ModelRepository, regions: Regions | None = None) -> None:
        self.repository = repository
        self.regions = regions or Regions(allowed=False)
        """Shared memory regions clients registered (``--allow-client-shm``)."""

    def seed(self, data: bytes, call: Call, deadline: float | None) -> SeedInference:
        """A serialized ``PredictRequest``; ``metadata["model"]``/``["version"]`` pick the
        model (default: the repository's)."""
        request = parse_request(data)
        metadata = request.metadata
        batcher = self._admit(metadata.get("model"), metadata.get("version"), call, deadline)
        arrays, call.items = decode_request(request, batcher.model)
        again = functools.partial(self.seed, data, call, deadline)
        return SeedInference(call, batcher, arrays, deadline, again, bool(request.raw))

    def v2(self, request: InferRequest, call: Call, deadline: float | None) -> V2Inference:
        """A parsed ``ModelInferRequest``; V2 names its model."""
        message = request.message
        require_model_name(message.model_name)
        batcher = self._admit(message.model_name, message.model_version or None, call, deadline)
        targets = output_targets(message.outputs)
        check_shm_outputs(self.regions, targets.values())  # before the model runs
        arrays, call.items = decode_infer(request, batcher.model, self.regions)
        selected = requested_outputs([o.name for o in message.outputs], batcher.model)
        again = functools.partial(self.v2, request, call, deadline)
        return V2Inference(
            call, batcher, arrays, deadline, again, message, selected, self.regions, targets
        )

    def target(self, name: str, version: str, call: Call, deadline: float | None) -> Batcher:
        """The admitted model version of a request whose transport decodes it itself (REST:
        its deadline, if any, is in the body, which is read after admission)."""
        require_model_name(name)
        return self._admit(name, version or None, call, deadline)

    def _admit(
        self, name: str | None, version: str | None, call: Call, deadline: float | None
    ) -> Batcher:
        batcher = self.repository.get(name, version)
        call.target(batcher)
        now = time.monotonic()
        if deadline is not None and now >= deadline:  # the caller has given up: read nothing
            raise DeadlineExceededError("the deadline passed before the request was read")
        try:
            batcher.admit(deadline, now)
        except VersionClosedError:  # a reload retired it since it was found: the one served now
            batcher = self.repository.get(name, version)
            call.target(batcher)
            batcher.admit(deadline, now)
        return batcher
