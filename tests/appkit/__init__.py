"""Applications the tests load by name (PYTHONPATH=tests): a room that counts what it
carried and says so, and one whose code has bugs on cue."""
