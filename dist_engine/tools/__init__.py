"""Command-line tools that drive the engine from outside: the gRPC load generator
(``dist-engine bench-serve``)."""
