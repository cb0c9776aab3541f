"""Test double of the CUDA runtime library as Polygraphy's `cuda.wrapper().handle` exposes it (a
ctypes CDLL of libcudart): only `cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device)`.
"""

from __future__ import annotations

CUDA_SUCCESS, CUDA_ERROR_INVALID_VALUE, CUDA_ERROR_NO_DEVICE = 0, 1, 100
CC_MAJOR, CC_MINOR = 75, 76  # cudaDevAttrComputeCapabilityMajor / ...Minor (CUDA runtime API)


class _Handle:
    def __init__(self, compute_capability: str | None):
        self.compute_capability = compute_capability
        self.calls: list[tuple[int, int]] = []

    def cudaDeviceGetAttribute(self, value, attr: int, device: int) -> int:  # noqa: N802 (the C name)
        self.calls.append((attr, device))
        if self.compute_capability is None:
            return CUDA_ERROR_NO_DEVICE
        if device != 0 or attr not in (CC_MAJOR, CC_MINOR):
            return CUDA_ERROR_INVALID_VALUE
        major, minor = self.compute_capability.split(".")
        value._obj.value = int(major if attr == CC_MAJOR else minor)  # `value` is ctypes.byref(c_int)
        return CUDA_SUCCESS


class FakeCuda:
    """What `polygraphy.cuda.wrapper()` returns: an object with a `handle` to the runtime library."""

    def __init__(self, compute_capability: str | None):
        self.handle = _Handle(compute_capability)
