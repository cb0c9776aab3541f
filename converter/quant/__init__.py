"""Quantization: calibration (+ decode steps), activation ranges, SmoothQuant smoothing and its alpha
search, the quantization plan with fake quant, and the float fallback of sensitive layers."""
