"""Textual inversion (A1111 package name)."""
