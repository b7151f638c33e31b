"""What every transport uses: access control, TLS files, health, the accounting of calls, and
the one mapping of errors to gRPC statuses."""
