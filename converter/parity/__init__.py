"""Parity: the INT8 candidate against the FP32 reference: metrics and gates, encoder metrics,
generation agreement, and the evaluation sets (each target's runner comes from `targets`)."""
