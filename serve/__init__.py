"""`ideogram4 serve`: the lean runtime behind Ray Serve (HTTP, gRPC, metrics). Needs the `serve` extra; the
plain runtime never imports this package's ray-dependent modules (app, worker)."""
