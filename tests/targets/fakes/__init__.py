"""CPU test doubles of the GPU backends' Python modules (`tensorrt`, `migraphx`, the CUDA runtime).

Each implements only the calls the converter makes, with the real names and signatures, and records
them; tests install one with `monkeypatch.setitem(sys.modules, ...)`. They exercise the converter's
control flow (what it asks the library for, in which order, with which values), not the libraries.
"""
