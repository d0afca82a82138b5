"""Slimscope desktop app: a Qt face over the engine; holds no compression logic."""
