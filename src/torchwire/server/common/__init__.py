"""What every transport uses: access control, TLS files, health, the accounting of calls, the
registered shared memory regions, and the one mapping of errors to gRPC statuses."""
