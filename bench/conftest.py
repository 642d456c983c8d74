import os

# One BLAS thread per process: the comparisons measure shmray's paths, not BLAS threading.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
