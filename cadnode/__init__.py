"""cadnode: a DICOM node for breast cancer screening with a fused vision-language model."""
__version__ = "0.1.0"
