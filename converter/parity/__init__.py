"""Parity: the INT8 candidate against the FP32 reference: metrics and gates, encoder metrics,
generation agreement, evaluation sets, and Polygraphy-style runners for every backend."""
