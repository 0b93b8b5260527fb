"""DeepCount: Deep Density-aware Count Regressor (Chen, "Deep Density-aware Count Regressor").

A VGG16 frontend and a strided-conv backbone regress one global count from a 384x512 crop;
five density-map branches feed gradients into the backbone during training ("gradient
fusion") and are run at inference only when a density map is asked for.
"""

__version__ = "0.1.0"

from .predict import Counter, CountResult  # noqa: E402  (the public entry point)

__all__ = ["Counter", "CountResult", "__version__"]
