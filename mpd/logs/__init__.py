"""Structured logs that never stall a loop."""
