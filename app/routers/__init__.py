"""HTTP only: parse requests, call services, shape responses. One module per transaction."""
