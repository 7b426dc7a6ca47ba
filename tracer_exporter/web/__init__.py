"""HTTP: routes (an error's kind to a status), who may control, TLS and basic auth, the server."""
