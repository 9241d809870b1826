"""Finding models on this machine and building pipelines from them, offline only.

``locate`` resolves model specs (base model, ControlNet, IP-Adapter, GLIGEN) on the file
system, ``device`` chooses device and precision, ``defaults`` holds the values each model
chooses for Layout fields left null, and ``assemble`` builds the pipeline, attaches the
conditioning models and keeps it loaded.
"""

import os

# The engine never downloads: every Hugging Face library fails fast instead of trying. Set
# here, before any module of this package can import one.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
