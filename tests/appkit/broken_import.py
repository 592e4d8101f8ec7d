"""A module that does not import."""
import this_module_does_not_exist  # noqa: F401
