"""Invoke task collections; each module is thin glue over one stage module."""
