"""What is tracked and what it counted: config, counters, the tracker, the state file. No kernel, no HTTP."""
