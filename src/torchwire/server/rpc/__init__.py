"""The gRPC transport: the seed and KServe V2 servicers, the native front end, the graceful stop
of grpc.aio, connection limits and reflection."""
