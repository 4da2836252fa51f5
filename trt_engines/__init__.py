"""Compiling and serving model packages on NVIDIA GPUs: the Triton model-repository generator
(``triton_repo``) and, later, the TensorRT engine builder. See trt_engines/README.md for what
has and has not been executed."""
