"""SRU (Simple Recurrent Unit) recurrence kernels for CuPy."""
