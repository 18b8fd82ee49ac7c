"""Experiment configuration: strict schema, YAML loading, inheritance and overrides."""
