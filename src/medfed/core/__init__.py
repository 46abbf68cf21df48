"""Shared types, the error hierarchy and the wire codec. Nothing here trains or talks."""
