"""Equiformer interatomic potential with memory levers for large molecules."""
