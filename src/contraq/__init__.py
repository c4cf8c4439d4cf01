"""contraq: a GFlowNet sampler of questions whose answers contradict an edit fact."""

__version__ = "0.1.0"
