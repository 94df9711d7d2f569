"""runlora_fx: find the LoRA layers in a model and run each in its cheapest equivalent contraction order.

Public API: `optimize`, `restore`, `explain` (whole models), `plan` (one layer shape), `calibrate` (device
profile for the cost model), `Plan`.
"""
from .api import explain, optimize, restore
from .planner.device import calibrate
from .planner.plan import Plan
from .planner.search import plan

__version__ = "0.1.0"
__all__ = ["Plan", "__version__", "calibrate", "explain", "optimize", "plan", "restore"]
