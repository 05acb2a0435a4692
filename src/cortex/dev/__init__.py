"""Developer tooling shipped with the package: a local multi-process cluster (`cortex dev up`) and the gRPC
stub generator."""
