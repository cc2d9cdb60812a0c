"""Triton kernels. Imported only when a Triton backend is chosen, so triton stays optional."""
import os

# Under TRITON_INTERPRET=1 (how CI checks these kernels on the CPU) tl.dot on bfloat16 operands
# returns garbage in triton 3.9's interpreter; kernels upcast to fp32 before tl.dot there. bf16
# products are exact in fp32, so the interpreted result is the same sum the GPU computes.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
