"""The configuration: its schema (one table), the checks of its values, reload."""
