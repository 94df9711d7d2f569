"""``python -m benchmarks ...``.

On a shared machine, OpenMP threads that spin-wait at every barrier while another process holds the second core
make small kernels tens of times slower (measured here: a 1-layer LLaMA step took 0.85 s with the default wait
policy and 0.05 s with PASSIVE, same 2 threads). The policy must be set before torch starts its thread pool, so
it is set here, before anything imports torch; an explicit OMP_WAIT_POLICY in the environment wins.
"""
import os
import sys

if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import main  # noqa: E402

raise SystemExit(main())
