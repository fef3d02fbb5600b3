"""All cryptography lives here: streaming AEAD, keys, wrapping. Nothing else imports it."""
