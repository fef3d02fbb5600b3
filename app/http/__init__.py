"""The HTTP machinery that is not a route: the TLS protocol, worker balancing, middlewares."""
