"""Artifacts: the versioned folder with its manifest, the per-layer report, the Triton model
repository (and its generate model), local serving, and the CI job matrix."""
