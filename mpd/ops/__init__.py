"""Operator interfaces: the control socket, mpdctl's commands, metrics, the agent."""
