import os
import sys

# Tests run on CPU, in float32, deterministically; tests that need several devices spawn their own
# processes with XLA_FLAGS set.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
