# The kernels run on CPU through Triton's interpreter; it must be on before triton is
# imported anywhere in the test session.
import os

os.environ["TRITON_INTERPRET"] = "1"
