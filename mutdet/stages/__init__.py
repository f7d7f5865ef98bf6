"""Stages: read artefacts, call the library, write artefacts. Only stages know paths."""
