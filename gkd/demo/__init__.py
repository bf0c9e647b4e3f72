"""`gkd demo`: the shipped plan plans/demo.yaml on the procedural benchmark (`gkd.data.synth`), summarised."""
from .run import DEFAULT_TEACHER, QUICK, DemoError, DemoResult, load_demo_plan, run_demo

__all__ = ["run_demo", "load_demo_plan", "DemoResult", "DemoError", "QUICK", "DEFAULT_TEACHER"]
