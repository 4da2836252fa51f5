"""Compiling and serving model packages on NVIDIA GPUs: the TensorRT engine builder (``build``,
with int8 calibration in ``calibration``) and the Triton model-repository generator
(``triton_repo``). See trt_engines/README.md for what has and has not been executed."""
