"""The HTTP machinery that is not a route: middleware, TLS, worker balancing."""
