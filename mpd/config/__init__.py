"""The configuration: its schema (one table), the checks of its values, the control
allow-lists. What a reload does with it is mpd/reloading.py's."""
