# The kernels run where VTPRUNE_TEST_DEVICE says: "cpu" (default) through Triton's
# interpreter, which must be on before triton is imported anywhere in the test session;
# "cuda" compiled, on the GPU (python -m pytest tests/kernels with VTPRUNE_TEST_DEVICE=cuda).
import os

DEVICE = os.environ.get("VTPRUNE_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
