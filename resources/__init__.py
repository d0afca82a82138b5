"""Bundled demo model, data recipe and icons."""
