"""gRPC server reflection over a private descriptor pool.

``ModelService`` has no package, so its descriptor must stay out of protobuf's default pool (it
would clash with a client generated from the founding proto in the same process). Reflection gets
its own pool instead: torchwire's descriptors from ``_proto/descriptors.binpb`` (written by
``make proto``) plus those of the other services it lists.
"""

from __future__ import annotations

from importlib import resources

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor
from google.protobuf.descriptor_pool import DescriptorPool


def _add_file(pool: DescriptorPool, file: FileDescriptor) -> None:
    try:
        pool.FindFileByName(file.name)
        return
    except KeyError:
        pass
    for dependency in file.dependencies:
        _add_file(pool, dependency)
    pool.Add(descriptor_pb2.FileDescriptorProto.FromString(file.serialized_pb))


def reflection_pool(*others: FileDescriptor) -> DescriptorPool:
    """A pool with torchwire's own descriptors and ``others`` (with their dependencies)."""
    pool = DescriptorPool()
    data = resources.files("torchwire._proto").joinpath("descriptors.binpb").read_bytes()
    for proto in descriptor_pb2.FileDescriptorSet.FromString(data).file:
        pool.Add(proto)
    for file in others:
        _add_file(pool, file)
    return pool
