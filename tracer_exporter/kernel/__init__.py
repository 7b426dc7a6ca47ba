"""The kernel side: the only importer of bcc. It returns plain data (model.counters,
model.health) and raises its own errors (errors.MapFull, errors.ProbeError)."""
