"""`gkd demo`: a procedural domain-generalization benchmark (`synth`) and the whole pipeline on it (`run`)."""
from .run import DEFAULT_TEACHER, FULL, QUICK, DemoError, DemoPlan, DemoResult, reset_accelerate_state, run_demo

__all__ = ["run_demo", "DemoPlan", "DemoResult", "DemoError", "FULL", "QUICK", "DEFAULT_TEACHER",
           "reset_accelerate_state"]
