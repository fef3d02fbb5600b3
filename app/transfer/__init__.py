"""Resumable uploads (tus 1.0) and pushes/pulls between partner gateways."""
