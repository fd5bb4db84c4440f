"""Serving stage: the gRPC runner, its backends, generation and the parity it proves while serving."""
